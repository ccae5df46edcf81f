"""A/B slots on the device: signature and hash checks, trial starts, crash-loop revert."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.ota import ArtifactRefused, SlotStore, fetch_artifact, load_trusted_keys
from fmtest.fleet import artifact, signing_key


def test_install_confirm_revert(tmp_path: Path) -> None:
    key, trusted = signing_key()
    s = SlotStore(tmp_path, trusted_keys=trusted, max_boot_attempts=2)
    assert s.active("model") is None
    v1, b1 = artifact(key, "1.0")
    v2, b2 = artifact(key, "2.0")
    a = s.install(v1, b1)
    assert (a.slot, a.version, a.pending) == ("a", "1.0", True) and a.path.read_bytes() == b1
    s.confirm("model")
    b = s.install(v2, b2)
    assert (b.slot, b.pending) == ("b", True)
    assert s.previous("model").version == "1.0"  # type: ignore[union-attr]
    assert s.install(v2, b2).slot == "b"  # the same again: nothing rewritten
    back = s.revert("model", reason="test")
    assert back is not None and back.version == "1.0" and not back.pending
    assert s.previous("model") is None  # before 1.0: the built-in version, never the reverted 2.0
    c = s.install(v2, b2)  # reinstalling goes to the spare slot again
    assert c.slot == "b" and c.pending
    s.confirm("model")
    v3, b3 = artifact(key, "3.0")
    d = s.install(v3, b3)  # overwrites slot a (1.0)
    assert d.slot == "a"
    assert s.revert("model", reason="failed").version == "2.0"  # type: ignore[union-attr]
    assert s.previous("model") is None  # 1.0 was overwritten by 3.0: the built-in version comes before 2.0
    assert s.revert("model", reason="rollback") is None and s.active("model") is None


def test_a_crash_loop_reverts_by_itself(tmp_path: Path) -> None:
    key, trusted = signing_key()
    s = SlotStore(tmp_path, trusted_keys=trusted, max_boot_attempts=2)
    v1, b1 = artifact(key, "1.0")
    v2, b2 = artifact(key, "2.0")
    s.install(v1, b1)
    s.boot("model")
    s.confirm("model")
    s.install(v2, b2)
    assert s.boot("model").version == "2.0"  # type: ignore[union-attr]
    # a fresh store object: the count survives a restart (it is on disk)
    s2 = SlotStore(tmp_path, trusted_keys=trusted, max_boot_attempts=2)
    assert s2.boot("model").version == "2.0"  # type: ignore[union-attr]
    third = s2.boot("model")
    assert third is not None and third.version == "1.0" and s2.reverts == 1
    assert s2.boot("model").version == "1.0"  # type: ignore[union-attr]  # confirmed slots are not counted


def test_tampering_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    key, trusted = signing_key()
    other, _ = signing_key()
    s = SlotStore(tmp_path, trusted_keys=trusted)
    m, data = artifact(key, "2.0")
    cases = [
        (m, data[:-1] + bytes([data[-1] ^ 1]), "hash_mismatch"),
        (m, data + b"x", "size_mismatch"),
        ({**m, "version": "2.1"}, data, "bad_signature"),
        ({**m, "signature": base64.b64encode(b"\0" * 64).decode()}, data, "bad_signature"),
        (artifact(other, "2.0", data=data)[0], data, "unknown_key"),
        ({**m, "signature": "%%%"}, data, "bad_manifest"),
        ({**m, "kind": "bootloader"}, data, "bad_manifest"),
    ]
    for manifest, body, reason in cases:
        with pytest.raises(ArtifactRefused) as e:
            s.install(manifest, body)
        assert e.value.reason == reason
    assert not list(tmp_path.rglob("*.bin")) and s.active("model") is None
    assert s.refused == {"hash_mismatch": 1, "size_mismatch": 1, "bad_signature": 2, "unknown_key": 1,
                         "bad_manifest": 2}


def test_keys_and_fetch(tmp_path: Path) -> None:
    key, trusted = signing_key()
    pem = tmp_path / "k.pub"
    pem.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    assert list(load_trusted_keys([pem])) == list(trusted)
    with pytest.raises(ConfigError):
        load_trusted_keys([tmp_path / "missing.pub"])
    f = tmp_path / "blob"
    f.write_bytes(b"12345")
    assert fetch_artifact(f.as_uri()) == b"12345"
    with pytest.raises(ArtifactRefused) as e:
        fetch_artifact(f.as_uri(), max_bytes=4)
    assert e.value.reason == "too_large"
    with pytest.raises(ArtifactRefused):
        fetch_artifact("ftp://x/y")
    with pytest.raises(ArtifactRefused):
        fetch_artifact((tmp_path / "nope").as_uri())
