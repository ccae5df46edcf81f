"""Signed artifacts (firmware images, edge models): the manifest a publisher signs and a device checks.

The signature (ed25519) covers :func:`manifest_bytes`: the canonical JSON of the manifest, which names
the artifact's SHA-256. A device checks the signature with a key it trusts, then the hash of the bytes
it fetched, before it installs anything (docs/rollouts.md). Pure: no I/O, no crypto library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["ARTIFACT_KINDS", "MANIFEST_FIELDS", "check_manifest", "manifest_bytes"]

ARTIFACT_KINDS: Final = ("firmware", "model")
MANIFEST_FIELDS: Final = ("kind", "name", "version", "sha256", "size")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_NAME: Final = re.compile(r"[A-Za-z0-9_.+-]{1,128}")


def check_manifest(m: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's signed fields, validated; raises ValueError naming the bad field."""
    if m.get("kind") not in ARTIFACT_KINDS:
        raise ValueError(f"kind: one of {ARTIFACT_KINDS}")
    for k in ("name", "version"):
        if not isinstance(m.get(k), str) or not _NAME.fullmatch(m[k]):
            raise ValueError(f"{k}: [A-Za-z0-9_.+-]{{1,128}}")
    if not isinstance(m.get("sha256"), str) or not _HEX64.fullmatch(m["sha256"]):
        raise ValueError("sha256: 64 lowercase hex digits")
    if type(m.get("size")) is not int or m["size"] < 0:
        raise ValueError("size: a byte count")
    return {k: m[k] for k in MANIFEST_FIELDS}


def manifest_bytes(m: Mapping[str, Any]) -> bytes:
    """What the signature covers: the signed fields as canonical JSON (sorted keys, no spaces)."""
    return json.dumps(check_manifest(m), sort_keys=True, separators=(",", ":")).encode()
