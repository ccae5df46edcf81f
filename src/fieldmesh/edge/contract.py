"""The device's side of a data contract: readings checked against a JSON Schema before they are sent.

A reading the schema refuses never enters the buffer: it is written to ``state/rejects.jsonl`` beside
the buffer with the failing path and reason, and counted (``schema.rejected`` in the agent's stats), so
nothing is dropped silently and the operator can see on the device what its firmware got wrong. The
schema describes one reading in the telemetry shape of docs/contract.md (``device_id``, ``ts``,
``measurements``, ``seq``, ``boot_id``, ``meta``); the gateway validates the same shape against the
subject's schema, so a schema registered from the device is checked on both sides of the uplink.

With a ``subject``, the agent registers its schema in the registry when it starts (Confluent's
``POST /subjects/{subject}/versions``): the registry answers the schema id, or 409 when the schema breaks
the subject's compatibility level. Registration is retried with capped backoff while the registry is
unreachable; a refusal is logged once with the registry's reasons and kept in the stats
(``schema.registration_error``). Readings keep flowing meanwhile: the local check needs no network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fieldmesh.core.errors import ConfigError

__all__ = ["ContractStats", "ReadingContract", "register_schema"]

log = logging.getLogger(__name__)

#: Rejects kept on the device; the file is cut in half (the older half dropped, and counted) beyond it.
MAX_REJECTS_BYTES: Final = 4 * 1024 * 1024


@dataclass
class ContractStats:
    """What the contract did: readings checked and refused, and where registration stands."""

    checked: int = 0
    rejected: int = 0
    rejects_truncated: int = 0
    schema_id: int | None = None
    registration_error: str | None = None
    registration_attempts: int = 0
    by_path: dict[str, int] = field(default_factory=dict)


class ReadingContract:
    """A compiled reading schema and the device-side rejects file.

    Args:
        schema_text: the JSON Schema of one reading, as text (registered as is).
        rejects_path: where refused readings are kept (JSON lines).
        source: where the schema came from, for error messages.
    """

    def __init__(self, *, schema_text: str, rejects_path: Path, source: str = "schema") -> None:
        import jsonschema_rs

        try:
            raw = json.loads(schema_text)
        except ValueError as exc:
            raise ConfigError(f"schema.file: {source} is not JSON: {exc}", key="schema.file") from exc
        try:
            self._validator = jsonschema_rs.validator_for(raw)
        except (ValueError, jsonschema_rs.ValidationError) as exc:
            raise ConfigError(f"schema.file: {source} is not a valid JSON Schema: {exc}", key="schema.file") from exc
        self.schema_text = schema_text
        self.rejects_path = rejects_path
        self.stats = ContractStats()

    @classmethod
    def from_file(cls, path: Path, *, rejects_path: Path) -> ReadingContract:
        """Load the schema file named by ``schema.file``."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"schema.file: cannot read {path}: {exc}", key="schema.file") from exc
        return cls(schema_text=text, rejects_path=rejects_path, source=str(path))

    def check(self, device_id: str, reading: dict[str, Any]) -> bool:
        """True when ``reading`` (the wire fields, without ``device_id``) meets the schema.

        A refused reading is appended to the rejects file with its first failing path and counted.
        """
        doc = {"device_id": device_id, **{k: v for k, v in reading.items() if v is not None}}
        self.stats.checked += 1
        if self._validator.is_valid(doc):
            return True
        err = next(iter(self._validator.iter_errors(doc)))
        path = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.instance_path)
        self.stats.rejected += 1
        self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
        self._keep({"at_ms": int(time.time() * 1000), "path": path, "reason": err.message, "reading": doc})
        return False

    def _keep(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        try:
            if self.rejects_path.exists() and self.rejects_path.stat().st_size > MAX_REJECTS_BYTES:
                lines = self.rejects_path.read_text().splitlines(keepends=True)
                keep = lines[len(lines) // 2:]
                self.stats.rejects_truncated += len(lines) - len(keep)
                tmp = self.rejects_path.with_suffix(".tmp")
                tmp.write_text("".join(keep))
                os.replace(tmp, self.rejects_path)
            with self.rejects_path.open("a") as f:
                f.write(line)
        except OSError as exc:  # the count above still says it was refused
            log.warning("cannot keep a refused reading in %s: %s", self.rejects_path, exc)

    def as_dict(self) -> dict[str, Any]:
        """The stats as the agent reports them."""
        s = self.stats
        return {"checked": s.checked, "rejected": s.rejected, "rejects_truncated": s.rejects_truncated,
                "by_path": dict(s.by_path), "schema_id": s.schema_id,
                "registration_error": s.registration_error, "registration_attempts": s.registration_attempts}


class RegistrationRefused(Exception):
    """The registry answered 4xx: retrying would not help."""


def _post(url: str, body: bytes, auth: str | None, timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        if 400 <= exc.code < 500:
            raise RegistrationRefused(f"{exc.code}: {text}") from exc
        raise OSError(f"registry answered {exc.code}: {text}") from exc


async def register_schema(
    contract: ReadingContract,
    *,
    registry_url: str,
    subject: str,
    auth: str | None,
    stop: asyncio.Event,
    initial_s: float = 0.5,
    cap_s: float = 30.0,
) -> None:
    """Register the contract's schema under ``subject``, retrying while the registry is unreachable."""
    url = f"{registry_url.rstrip('/')}/subjects/{subject}/versions"
    body = json.dumps({"schemaType": "JSON", "schema": contract.schema_text}).encode()
    delay = initial_s
    while not stop.is_set():
        contract.stats.registration_attempts += 1
        try:
            out = await asyncio.to_thread(_post, url, body, auth, 10.0)
            contract.stats.schema_id = int(out["id"])
            contract.stats.registration_error = None
            log.info("reading schema registered under %s: id %d", subject, contract.stats.schema_id)
            return
        except RegistrationRefused as exc:
            contract.stats.registration_error = str(exc)
            log.error("the registry refused the reading schema for subject %s: %s", subject, exc)
            return
        except (OSError, ValueError, KeyError) as exc:
            contract.stats.registration_error = f"unreachable: {exc}"
            log.warning("schema registry %s unreachable (%s); next try in %.1f s", registry_url, exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(cap_s, delay * 2)
