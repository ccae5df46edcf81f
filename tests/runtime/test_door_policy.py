"""The door's view of the device registry (which certificates, which users, when to pin), and nats-server
applying a new view to live connections: a revoked certificate that shares its subject with a valid one
is shut out by pinning while the valid one keeps working."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldmesh.runtime.doorauth import DoorTls, internal_auth, policy_from_registry
from fieldmesh.runtime.natsserver import EmbeddedNats, free_port
from fieldmesh.store.registry import Certificate, DeviceRegistry
from fmtest.door import Probe, tls_context
from fmtest.pki import CA, Issued


def _record(reg: DeviceRegistry, device_id: str, c: Issued) -> None:
    reg.add_certificate(Certificate(serial=c.serial, device_id=device_id, subject=c.subject, fingerprint=c.fingerprint,
                                    not_before_ms=c.not_before_ms, not_after_ms=c.not_after_ms, revoked_ms=None,
                                    pem=c.pem), actor="test")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DeviceRegistry]:
    reg = DeviceRegistry(f"sqlite:///{tmp_path / 'reg.db'}")
    yield reg
    reg.close()


def test_policy_takes_valid_certificates_of_active_devices(tmp_path: Path, registry: DeviceRegistry) -> None:
    ca = CA(tmp_path / "pki", "root")
    certs = {d: ca.device(d) for d in ("a", "b", "s", "r")}
    expired = ca.device("x", expired=True)
    for d in ("a", "b", "r", "x"):
        registry.add(d, actor="t")
    registry.add("s", status="suspended", actor="t")
    for d in ("a", "b", "s", "r"):
        _record(registry, d, certs[d])
    _record(registry, "x", expired)
    registry.revoke_certificate(certs["r"].serial, actor="t")
    p = policy_from_registry(registry)
    assert {i.device_id for i in p.identities} == {"a", "b"}
    assert p.users() == {"CN=a,O=fieldmesh": "a", "CN=b,O=fieldmesh": "b"}
    assert p.mosquitto_users() == {"a": "a", "b": "b"}
    assert not p.pin  # r's revoked certificate has a subject nobody else has: dropping its user is enough
    renewed = ca.device("a", name="device-a-2")  # a renewal with the same subject
    _record(registry, "a", renewed)
    assert not policy_from_registry(registry).pin
    registry.revoke_certificate(certs["a"].serial, actor="t")
    p = policy_from_registry(registry)
    assert p.pin and p.users() == {"CN=a,O=fieldmesh": "a", "CN=b,O=fieldmesh": "b"}
    assert len(p.pins()) == 2  # a's renewed key and b's


@pytest.mark.integration
def test_nats_pins_when_a_revoked_certificate_shares_its_subject(tmp_path: Path, registry: DeviceRegistry) -> None:
    ca = CA(tmp_path / "pki", "root")
    server = ca.server()
    old, new = ca.device("a"), ca.device("a", name="device-a-2")
    registry.add("a", actor="t")
    _record(registry, "a", old)
    _record(registry, "a", new)
    tls = DoorTls(port=free_port(), cert=server.cert_path, key=server.key_path, ca=ca.cert_path,
                  require_client_cert=True)
    srv = EmbeddedNats(store_dir=tmp_path / "nats", mqtt_port=tls.port, auth=internal_auth(tmp_path),
                       mqtt_tls=tls, mqtt_anonymous=False, policy=policy_from_registry(registry))
    srv.start()
    try:
        def probe(c: Issued) -> Probe:
            return Probe(tls.port, tls_context(ca.cert_path, c.cert_path, c.key_path))

        for c in (old, new):
            p = probe(c)
            assert p.connect(), (p.connack, p.error)
            p.close()
        live_new = probe(new)
        assert live_new.connect()
        registry.revoke_certificate(old.serial, actor="t")
        t0 = time.monotonic()
        assert srv.set_policy(policy_from_registry(registry)) == "restart"
        print(f"\npinning restart of nats-server took {time.monotonic() - t0:.2f} s")
        p = probe(old)
        assert not p.connect(), "the revoked certificate still gets in"
        p.close()
        p = probe(new)
        assert p.connect(), (p.connack, p.error)
        p.close()
        # pinned: a new device's certificate needs a new pin, which set_policy applies (another restart)
        b = ca.device("b")
        registry.add("b", actor="t")
        _record(registry, "b", b)
        assert srv.set_policy(policy_from_registry(registry)) == "restart"
        p = probe(b)
        assert p.connect(), (p.connack, p.error)
        p.close()
        live_new.close()
    finally:
        srv.stop()


def test_no_pinning_for_a_revoked_certificate_that_expired(tmp_path: Path, registry: DeviceRegistry) -> None:
    ca = CA(tmp_path / "pki", "root")
    current, old = ca.device("c"), ca.device("c", expired=True, name="device-c-old")
    registry.add("c", actor="t")
    _record(registry, "c", current)
    _record(registry, "c", old)
    registry.revoke_certificate(old.serial, actor="t")
    p = policy_from_registry(registry)
    assert not p.pin  # TLS refuses the expired certificate by itself
    assert [i.serial for i in p.identities] == [current.serial]
