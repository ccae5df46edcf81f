"""What the store-backed commands share: the acting user, a clear error with exit 2, an opened store."""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from fieldmesh.core.errors import FieldmeshError

__all__ = ["actor", "fail", "opened"]

err = Console(stderr=True)
T = TypeVar("T")


def fail(exc: Exception | str) -> NoReturn:
    """Print ``exc`` as an error and exit 2."""
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def actor() -> str:
    """Who runs the command, as audit entries name it."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return f"cli:uid{os.getuid()}"


@contextmanager
def opened(factory: Callable[[str], T], data_dir: Path, store_url: str | None) -> Iterator[T]:
    """``factory(url)`` on the store (``store_url`` or the one under ``data_dir``), closed after; a
    FieldmeshError opening or inside it is a clear message and exit 2."""
    from fieldmesh.store import default_store_url

    try:
        obj: Any = factory(store_url or default_store_url(data_dir))
    except FieldmeshError as exc:
        fail(exc)
    try:
        yield obj
    except FieldmeshError as exc:
        fail(exc)
    finally:
        obj.close()
