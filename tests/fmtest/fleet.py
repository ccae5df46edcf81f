"""Helpers for job and rollout tests: a signing key, signed artifacts, a controller on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fieldmesh.control.jobrunner import JobController, MqttLink, run_controller
from fieldmesh.control.rollouts import Telemetry, key_id, sign_artifact
from fieldmesh.store.jobs import JobStore


def signing_key() -> tuple[Ed25519PrivateKey, dict[str, Any]]:
    """A fresh signing key and the trusted-keys map devices hold."""
    k = Ed25519PrivateKey.generate()
    pub = k.public_key()
    return k, {key_id(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)): pub}


def artifact(key: Ed25519PrivateKey, version: str, *, kind: str = "model", name: str = "anomaly",
             data: bytes | None = None) -> tuple[dict[str, Any], bytes]:
    """A signed manifest (with its url) and its bytes."""
    body = data if data is not None else f"{name}-{version}-".encode() + secrets.token_bytes(256)
    m = sign_artifact(key, body, kind=kind, name=name, version=version)
    m["url"] = f"https://artifacts.example/{name}/{version}.bin"
    return m, body


@contextlib.asynccontextmanager
async def controller(store: JobStore, port: int, *, devices: Callable[[], Iterable[Any]] | None = None,
                     telemetry: Telemetry | None = None, tick_s: float = 0.05) -> AsyncIterator[JobController]:
    """A job controller on the broker at ``127.0.0.1:port``, ticking until the block ends."""
    holder: list[JobController] = []
    link = MqttLink(f"mqtt://127.0.0.1:{port}", client_id=f"fm-jobs-{secrets.token_hex(3)}",
                    on_message=lambda t, p: holder[0].handle_message(t, p))
    ctl = JobController(store, publish=link.publish, devices=devices, telemetry=telemetry)
    holder.append(ctl)
    assert link.wait_connected(10), "the controller did not connect"
    stop = asyncio.Event()
    task = asyncio.create_task(run_controller(ctl, stop=stop, tick_s=tick_s))
    try:
        yield ctl
    finally:
        stop.set()
        await task
        link.close()


async def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``pred`` until true; AssertionError naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def seed(slots_of: Callable[[str], Any], devices: Iterable[str], manifest: dict[str, Any], data: bytes) -> None:
    """Install and confirm ``manifest`` on every device (the version they run before a rollout)."""
    for d in devices:
        s = slots_of(d)
        s.install(manifest, data)
        s.boot(manifest["kind"])
        s.confirm(manifest["kind"])


__all__ = ["artifact", "controller", "seed", "signing_key", "wait_for"]
