"""Identity of a reading, for de-duplication (docs/contract.md).

Identity is ``event_id`` if given, else ``(device_id, boot_id, seq)`` if ``seq`` is given,
else ``(device_id, ts, measurements)``. Identities are scoped to the device. The canonical
identity string is hashed with BLAKE2b-128; the first 63 bits are the store key, the next
64 bits a check value that tells a duplicate from a key collision.
"""

from __future__ import annotations

from hashlib import blake2b

import msgspec

__all__ = ["identity_digest", "identity_string"]

_SEP = "\x1f"
_enc = msgspec.json.Encoder(order="sorted")


def identity_string(
    device_id: str,
    ts_ms: int,
    measurements: dict[str, float | bool],
    seq: int | None = None,
    boot_id: str | None = None,
    event_id: str | None = None,
) -> str:
    """Return the canonical identity string of a reading."""
    if event_id is not None:
        return f"e{_SEP}{device_id}{_SEP}{event_id}"
    if seq is not None:
        return f"s{_SEP}{device_id}{_SEP}{boot_id or ''}{_SEP}{seq}"
    return f"m{_SEP}{device_id}{_SEP}{ts_ms}{_SEP}{_enc.encode(measurements).decode()}"


def identity_digest(identity: str) -> tuple[int, int]:
    """Hash an identity string to ``(key, chk)``: a 63-bit key and a signed 64-bit check."""
    d = blake2b(identity.encode(), digest_size=16).digest()
    key = int.from_bytes(d[:8], "big") >> 1
    chk = int.from_bytes(d[8:], "big", signed=True)
    return key, chk
