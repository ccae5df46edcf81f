"""Over-the-air updates on the device: verify a signed artifact, install it in the spare A/B slot, and go
back to the previous slot by itself when the new one does not start or crash-loops (docs/rollouts.md).

Layout under ``root``, per artifact kind (``model``, ``firmware``)::

    root/model/a.bin, root/model/b.bin   the two slots
    root/model/state.json                {"active": "b", "pending": true, "boot_attempts": 1,
                                          "slots": {"a": {manifest}, "b": {manifest, "before": {"slot": "a",
                                                    "version": ..., "sha256": ...}}}}

Each slot remembers what was active before it was installed (``before``): a revert goes there, if that
slot still holds that version, else to the built-in version (no slot). A version that failed its trial
is therefore never a revert target: after 1.0 -> 2.0 -> 3.0 (failed, reverted), the version before 2.0
is 1.0 again, not 3.0.

An install writes the spare slot (fsynced), then flips ``active`` with ``pending`` set: the new version
is on trial. Each start of a pending slot (:meth:`SlotStore.boot`) counts an attempt; past
``max_boot_attempts`` without :meth:`SlotStore.confirm` (a passed health check) the store reverts to
the previous slot. ``state.json`` is replaced atomically, so a power cut leaves one slot or the other
active, never a half-written one.

Refusals (:class:`ArtifactRefused`, ``.reason``): ``bad_manifest``, ``unknown_key``, ``bad_signature``,
``size_mismatch``, ``hash_mismatch``, ``too_large``, ``fetch_failed``. Nothing is written for a refused
artifact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fieldmesh.core.artifact import ARTIFACT_KINDS, check_manifest, manifest_bytes
from fieldmesh.core.errors import ConfigError, FieldmeshError

__all__ = ["ArtifactRefused", "SlotInfo", "SlotStore", "fetch_artifact", "load_trusted_keys"]

log = logging.getLogger("fieldmesh.edge.ota")
_DEFAULT_MAX: Final = 256 * 1024 * 1024


class ArtifactRefused(FieldmeshError):
    """An artifact the device will not install (``.reason``, ``.detail``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Any]:
    """Ed25519 public keys (PEM files) by key id; ConfigError names a file that is not one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    out: dict[str, Any] = {}
    for p in paths:
        try:
            key = load_pem_public_key(Path(p).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"jobs.trusted_keys: cannot read {p}: {exc}", key="jobs.trusted_keys") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"jobs.trusted_keys: {p} is not an Ed25519 public key", key="jobs.trusted_keys")
        out[_key_id(key.public_bytes(Encoding.Raw, PublicFormat.Raw))] = key
    return out


def fetch_artifact(url: str, *, max_bytes: int = _DEFAULT_MAX, timeout_s: float = 60.0) -> bytes:
    """The bytes at ``url`` (``https://``, ``http://`` or ``file://``), at most ``max_bytes``."""
    if not url.startswith(("https://", "http://", "file://")):
        raise ArtifactRefused("fetch_failed", f"unsupported URL scheme: {url[:40]!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            data: bytes = r.read(max_bytes + 1)
    except OSError as exc:
        raise ArtifactRefused("fetch_failed", f"{url}: {exc}") from exc
    if len(data) > max_bytes:
        raise ArtifactRefused("too_large", f"more than {max_bytes} bytes")
    return data


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds."""

    kind: str
    slot: str
    version: str
    name: str
    path: Path
    pending: bool


class SlotStore:
    """A/B slots of one device.

    Args:
        root: where slots and their state live.
        trusted_keys: Ed25519 public keys by key id (:func:`load_trusted_keys`).
        max_boot_attempts: starts of a pending slot before the store reverts it.
    """

    def __init__(self, root: Path, *, trusted_keys: Mapping[str, Any], max_boot_attempts: int = 3) -> None:
        self.root = Path(root)
        self.trusted_keys = dict(trusted_keys)
        self.max_boot_attempts = max_boot_attempts
        self.reverts = 0
        self.refused: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------------
    def _state_path(self, kind: str) -> Path:
        if kind not in ARTIFACT_KINDS:
            raise ArtifactRefused("bad_manifest", f"kind: one of {ARTIFACT_KINDS}")
        return self.root / kind / "state.json"

    def _load(self, kind: str) -> dict[str, Any]:
        p = self._state_path(kind)
        if not p.exists():
            return {"active": None, "pending": False, "boot_attempts": 0, "slots": {}}
        st: dict[str, Any] = json.loads(p.read_text())
        return st

    def _save(self, kind: str, st: Mapping[str, Any]) -> None:
        p = self._state_path(kind)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(st, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def _info(self, kind: str, st: Mapping[str, Any], slot: str | None) -> SlotInfo | None:
        if slot is None or slot not in st["slots"]:
            return None
        m = st["slots"][slot]
        return SlotInfo(kind=kind, slot=slot, version=m["version"], name=m["name"],
                        path=self.root / kind / f"{slot}.bin", pending=bool(st["pending"]) and slot == st["active"])

    def active(self, kind: str) -> SlotInfo | None:
        """The slot in use (None: nothing installed, the built-in version)."""
        st = self._load(kind)
        return self._info(kind, st, st["active"])

    @staticmethod
    def _before(st: Mapping[str, Any], slot: str | None) -> str | None:
        if slot is None or slot not in st["slots"]:
            return None
        b = st["slots"][slot].get("before")
        if not b:
            return None
        held = st["slots"].get(b["slot"])
        if held is None or held["version"] != b["version"] or held["sha256"] != b["sha256"]:
            return None  # overwritten since: the built-in version is what came before
        return str(b["slot"])

    def previous(self, kind: str) -> SlotInfo | None:
        """What a revert goes back to (None: the built-in version)."""
        st = self._load(kind)
        return self._info(kind, st, self._before(st, st["active"]))

    # -- install -----------------------------------------------------------------------------
    def verify(self, manifest: Mapping[str, Any], data: bytes) -> dict[str, Any]:
        """The signed fields of ``manifest`` once its signature and ``data`` check out; else ArtifactRefused."""
        from cryptography.exceptions import InvalidSignature

        try:
            signed = check_manifest(manifest)
            sig = base64.b64decode(str(manifest.get("signature", "")), validate=True)
        except (ValueError, TypeError) as exc:
            raise self._refuse("bad_manifest", str(exc)) from None
        key = self.trusted_keys.get(str(manifest.get("key_id")))
        if key is None:
            raise self._refuse("unknown_key", f"key {manifest.get('key_id')!r} is not trusted")
        try:
            key.verify(sig, manifest_bytes(signed))
        except InvalidSignature:
            raise self._refuse("bad_signature", "the manifest's signature does not verify") from None
        if len(data) != signed["size"]:
            raise self._refuse("size_mismatch", f"{len(data)} bytes, the manifest says {signed['size']}")
        if hashlib.sha256(data).hexdigest() != signed["sha256"]:
            raise self._refuse("hash_mismatch", "the bytes' SHA-256 is not the manifest's")
        return signed

    def _refuse(self, reason: str, detail: str) -> ArtifactRefused:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return ArtifactRefused(reason, detail)

    def install(self, manifest: Mapping[str, Any], data: bytes) -> SlotInfo:
        """Verify, write the spare slot, and make it active on trial (pending)."""
        signed = self.verify(manifest, data)
        kind = signed["kind"]
        st = self._load(kind)
        act = self._info(kind, st, st["active"])
        if act is not None and act.version == signed["version"] and st["slots"][act.slot]["sha256"] == signed["sha256"]:
            return act  # already installed (a redelivered job)
        slot = "b" if st["active"] == "a" else "a"
        path = self.root / kind / f"{slot}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        old = st["active"]
        before = ({"slot": old, "version": st["slots"][old]["version"], "sha256": st["slots"][old]["sha256"]}
                  if old is not None else None)
        st["slots"][slot] = {**signed, "before": before}
        st["active"] = slot
        st["pending"], st["boot_attempts"] = True, 0
        self._save(kind, st)
        info = self._info(kind, st, slot)
        assert info is not None
        return info

    def confirm(self, kind: str, *, version: str | None = None) -> None:
        """The active slot proved itself: it is no longer on trial (only if it holds ``version``, when given)."""
        st = self._load(kind)
        act = st["active"]
        if version is not None and (act is None or st["slots"][act]["version"] != version):
            return  # another version is active by now
        if st["pending"]:
            st["pending"], st["boot_attempts"] = False, 0
            self._save(kind, st)

    def revert(self, kind: str, *, reason: str) -> SlotInfo | None:
        """Go back to the previous slot; returns it (None: back to the built-in version)."""
        st = self._load(kind)
        if st["active"] is None:
            return None
        old = st["active"]
        st["active"] = self._before(st, old)
        st["pending"], st["boot_attempts"] = False, 0
        st["last_revert"] = {"from": st["slots"][old]["version"], "reason": reason}
        self._save(kind, st)
        self.reverts += 1
        log.warning("ota: %s reverted from %s: %s", kind, st["slots"][old]["version"], reason)
        return self._info(kind, st, st["active"])

    def boot(self, kind: str) -> SlotInfo | None:
        """Called as the active slot starts: counts a trial start, reverts past ``max_boot_attempts``."""
        st = self._load(kind)
        if st["active"] is None:
            return None
        if st["pending"]:
            st["boot_attempts"] += 1
            if st["boot_attempts"] > self.max_boot_attempts:
                return self.revert(kind, reason=f"crash loop: {st['boot_attempts'] - 1} starts without a health check")
            self._save(kind, st)
        return self._info(kind, st, st["active"])
