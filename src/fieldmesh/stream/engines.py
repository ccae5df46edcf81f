"""The stream engines by the name ``ProcessorSettings.engine`` gives them (typed: each module must
implement :class:`~fieldmesh.stream.base.StreamEngine`, which mypy checks here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from fieldmesh.stream import columnar, reference
from fieldmesh.stream.base import StreamEngine

__all__ = ["ENGINES"]

ENGINES: Final[Mapping[str, StreamEngine]] = {"columnar": columnar, "reference": reference}
