"""Mutual TLS at the MQTT door of ``fieldmesh up``, on both doors, with device certificates from the
device registry: who gets in (no certificate, wrong CA, expired, revoked, unregistered, suspended,
valid, TLS below 1.2), what a device may do once in (its own topics only), client-id takeover,
revocation while connected (measured), and ``--mqtt-host`` beyond loopback without client certificates.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats
import pytest

from fieldmesh.store import default_store_url, load_store
from fieldmesh.store.registry import Certificate, DeviceRegistry
from fmtest.door import Probe, telemetry, tls_context
from fmtest.pki import CA, Issued
from fmtest.procs import Up, free_port

pytestmark = pytest.mark.integration


@dataclass
class Door:
    up: Up
    kind: str
    tls_port: int
    ca: CA
    wrong: CA
    certs: dict[str, Issued]
    registry: DeviceRegistry

    def ctx(self, who: str, **kw: Any) -> ssl.SSLContext:
        c = self.certs[who]
        return tls_context(self.ca.cert_path, c.cert_path, c.key_path, **kw)

    def probe(self, who: str | None, *, client_id: str | None = None, clean: bool = True, **kw: Any) -> Probe:
        ctx = tls_context(self.ca.cert_path) if who is None else self.ctx(who, **kw)
        return Probe(self.tls_port, ctx, client_id=client_id, clean_session=clean)

    def stored(self, device_id: str) -> int:
        with sqlite3.connect(f"file:{self.up.data_dir / 'store.db'}?mode=ro", uri=True, timeout=30) as con:
            return int(con.execute("SELECT count(*) FROM readings WHERE device_id = ?", (device_id,)).fetchone()[0])

    def barrier(self) -> None:
        """A reading of dev-a, stored: whatever was published before it has been through the pipeline."""
        before = self.stored("dev-a")
        p = self.probe("dev-a")
        assert p.connect(), (p.connack, p.error)
        assert p.publish("devices/dev-a/telemetry", telemetry("dev-a", 0.5))
        p.close()
        deadline = time.monotonic() + 60
        while self.stored("dev-a") <= before:
            assert time.monotonic() < deadline, f"dev-a's reading was not stored\n{self.up.tail()}"
            time.sleep(0.2)

    def internal_publish(self, topic: str, payload: bytes) -> None:
        """Publish as fieldmesh itself (the internal user), as the twin's desired config is."""
        auth = json.loads((self.up.data_dir / "secrets" / "internal.json").read_text())
        if self.kind == "mosquitto":
            p = Probe(self.up.mqtt_port, user=auth["user"], password=auth["password"])
            assert p.connect(), p.connack
            assert p.publish(topic, payload)
            p.close()
            return
        bus = urlparse(json.loads((self.up.data_dir / "runtime.json").read_text())["bus_url"])

        async def main() -> None:
            nc = await nats.connect(f"nats://{bus.hostname}:{bus.port}", user=auth["user"], password=auth["password"])
            await nc.publish(topic.replace("/", "."), payload)
            await nc.flush()
            await nc.close()

        asyncio.run(main())


def _record(reg: DeviceRegistry, device_id: str, c: Issued, *, revoked: bool = False) -> None:
    reg.add_certificate(Certificate(serial=c.serial, device_id=device_id, subject=c.subject, fingerprint=c.fingerprint,
                                    not_before_ms=c.not_before_ms, not_after_ms=c.not_after_ms,
                                    revoked_ms=int(time.time() * 1000) - 1000 if revoked else None, pem=c.pem),
                        actor="test")


@pytest.fixture(scope="module", params=["nats", "mosquitto"])
def door(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    root = tmp_path_factory.mktemp(f"door-{request.param}")
    ca, wrong = CA(root / "pki", "root"), CA(root / "pki", "wrong")
    server = ca.server()
    certs = {name: ca.device(name) for name in ("dev-a", "dev-b", "dev-c", "dev-r", "dev-s", "dev-u")}
    certs["expired"] = ca.device("dev-x", expired=True)
    certs["wrong_ca"] = wrong.device("dev-a", name="wrong-dev-a")
    data = root / "data"
    data.mkdir()
    store_url = default_store_url(data)
    load_store(store_url).close()
    reg = DeviceRegistry(store_url)
    for dev in ("dev-a", "dev-b", "dev-c", "dev-r", "dev-x"):
        reg.add(dev, actor="test")
        _record(reg, dev, certs["expired" if dev == "dev-x" else dev], revoked=dev == "dev-r")
    reg.add("dev-s", status="suspended", actor="test")
    _record(reg, "dev-s", certs["dev-s"])
    # what 'fieldmesh ca revoke' leaves for the Mosquitto door (nats-server takes revocation from the registry)
    ca.revoke(certs["dev-r"])
    (data / "ca").mkdir()
    ca.write_crl(data / "ca" / "crl.pem")
    tls_port = free_port()
    host = "0.0.0.0" if request.param == "nats" else "127.0.0.1"  # beyond loopback: allowed with client certs
    up = Up(data, "--door", request.param, "--mqtt-host", host, "--mqtt-tls-port", str(tls_port),
            "--mqtt-tls-cert", str(server.cert_path), "--mqtt-tls-key", str(server.key_path),
            "--mqtt-ca", str(ca.cert_path), "--require-client-cert").start()
    try:
        yield Door(up, request.param, tls_port, ca, wrong, certs, reg)
    finally:
        reg.close()
        assert up.stop() == 0, up.tail()


def test_start_line_names_the_mode(door: Door) -> None:
    line = " ".join(door.up.tail().split())  # as printed, wrapped
    assert "door: mutual TLS on" in line
    # dev-a, dev-b, dev-c; not dev-r's (revoked), dev-x's (expired), dev-s's (suspended), dev-u's (unregistered)
    assert "registry: 3 valid" in line


@pytest.mark.parametrize("who", ["none", "wrong_ca", "expired", "revoked", "tls1.1"])
def test_refused_at_the_handshake(door: Door, who: str) -> None:
    if who == "none":
        p = door.probe(None)
    elif who == "wrong_ca":
        p = Probe(door.tls_port, tls_context(door.ca.cert_path, door.certs["wrong_ca"].cert_path,
                                             door.certs["wrong_ca"].key_path))
    elif who == "tls1.1":
        p = door.probe("dev-a", max_version=ssl.TLSVersion.TLSv1_1)
    else:
        p = door.probe("dev-r" if who == "revoked" else "expired")
    assert not p.connect(), f"{who} was let in"
    p.close()


def test_refusals_are_counted(door: Door) -> None:
    """What the broker refuses never reaches fieldmesh: 'up' counts it from the door's log, by reason."""
    before = door.up.get("/stats")["door_refused"]
    for who in (None, "expired"):  # no certificate; an expired one
        p = door.probe(who)
        assert not p.connect()
        p.close()
    want = {"tls_handshake": 2, "unknown_device": 0}
    if door.kind == "nats":  # Mosquitto lets a device the registry lacks in; the gateway dead-letters it
        p = door.probe("dev-u")
        assert not p.connect()
        p.close()
        want["unknown_device"] = 1

    def done(st: dict[str, Any]) -> bool:
        return all(st["door_refused"][r] >= before[r] + n for r, n in want.items())

    st = door.up.wait_for(done, timeout_s=30)
    assert {r: st["door_refused"][r] - before[r] for r in want} == want
    with urllib.request.urlopen(f"http://127.0.0.1:{door.up.http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    values = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("fieldmesh_door_refused_total{")}
    assert values["tls_handshake"] >= before["tls_handshake"] + 2, metrics


@pytest.mark.parametrize("who", ["dev-u", "dev-s"])  # a certificate of our CA, but no active device in the registry
def test_unregistered_and_suspended_devices_get_nothing_through(door: Door, who: str) -> None:
    p = door.probe(who)
    connected = p.connect()
    if door.kind == "nats":
        assert not connected  # no user maps its certificate
    else:
        # Mosquitto takes every certificate of the CA that is not on the CRL, and its ACL lets it publish on
        # its own topics; the gateway (registration enforced by 'up' at this door) dead-letters it, counted
        assert connected
        reason = "unknown_device" if who == "dev-u" else "unauthorized"
        before = door.up.get("/stats")["dead_lettered"].get(reason, 0)
        assert p.publish(f"devices/{who}/telemetry", telemetry(who, 1.0))
        door.up.wait_for(lambda st: st["dead_lettered"].get(reason, 0) > before, timeout_s=30)
    p.close()
    door.barrier()
    assert door.stored(who) == 0


def test_valid_device_publishes_its_own_topics_only(door: Door) -> None:
    a = door.probe("dev-a")
    assert a.connect(), (a.connack, a.error)
    refused = a.subscribe("#", "devices/dev-b/config", "devices/+/telemetry", "$JS/API/#")
    assert a.subscribe("devices/dev-a/config") == [1]
    b = door.probe("dev-b")
    assert b.connect()
    assert b.subscribe("devices/dev-b/config") == [1]
    before = door.stored("dev-a")
    a.publish("devices/dev-b/telemetry", telemetry("dev-b", 66.0))  # as another device: dropped at the door
    a.publish("devices/dev-a/telemetry", telemetry("dev-b", 67.0))  # the payload names another device
    a.publish("devices/dev-b/config", b'{"version": 99}')
    assert a.publish("devices/dev-a/telemetry", telemetry("dev-a", 1.0))
    marker = uuid.uuid4().hex.encode()
    door.internal_publish("devices/dev-b/config", marker)
    door.internal_publish("devices/dev-a/config", marker + b"-a")
    deadline = time.monotonic() + 30
    while door.stored("dev-a") < before + 1 or not b.messages or not a.messages:
        assert time.monotonic() < deadline, (door.stored("dev-a"), a.messages, b.messages)
        time.sleep(0.1)
    time.sleep(1.0)
    assert door.stored("dev-b") == 0
    # the payload naming dev-b on dev-a's own topic: the gateway's identity check dead-letters it, as
    # unauthorized since the door authenticates topics ('up' sets gateway.authenticated_topics)
    door.up.wait_for(lambda st: st["dead_lettered"].get("unauthorized", 0) >= 1, timeout_s=30)
    assert b.messages == [("devices/dev-b/config", marker)]  # not dev-a's forged config
    assert a.messages == [("devices/dev-a/config", marker + b"-a")]  # nothing of dev-b's, nothing internal
    if door.kind == "nats":
        assert refused == [128, 128, 128, 128]
    a.close()
    b.close()


def test_a_device_gets_its_own_jobs_only(door: Door) -> None:
    """Jobs (docs/rollouts.md): a device subscribes to its own notify topic, never another's."""
    a = door.probe("dev-a")
    assert a.connect(), (a.connack, a.error)
    refused = a.subscribe("devices/dev-b/jobs/notify", "devices/+/jobs/notify", "devices/+/jobs/+/update")
    assert a.subscribe("devices/dev-a/jobs/notify") == [1]
    marker = uuid.uuid4().hex.encode()
    door.internal_publish("devices/dev-b/jobs/notify", marker + b"-b")
    door.internal_publish("devices/dev-a/jobs/notify", marker)
    deadline = time.monotonic() + 30
    while not a.messages:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)
    assert a.messages == [("devices/dev-a/jobs/notify", marker)]  # nothing of dev-b's
    if door.kind == "nats":
        assert refused == [128, 128, 128]
    a.close()


def test_client_id_takeover(door: Door) -> None:
    victim_id = f"victim-{uuid.uuid4().hex[:6]}"
    a = door.probe("dev-a", client_id=victim_id, clean=False)
    assert a.connect()
    assert a.subscribe("devices/dev-a/config") == [1]
    b = door.probe("dev-b", client_id=victim_id, clean=False)
    assert b.connect()
    time.sleep(1.0)
    secret = uuid.uuid4().hex.encode()
    door.internal_publish("devices/dev-a/config", secret)
    time.sleep(1.5)
    assert all(secret not in m for _, m in b.messages), "the intruder got the victim's session messages"
    if door.kind == "mosquitto":
        # use_username_as_clientid: the intruder's client id is its own device id; the victim stays on
        assert a.disconnected_at is None
        assert ("devices/dev-a/config", secret) in a.messages
    else:
        # nats-server replaces the older connection of a client id (MQTT 3.1.1 asks it to): the victim is
        # kicked off, but its session's subscriptions stay its own (docs/security.md, "Client ids")
        assert a.disconnected_at is not None
    a.close()
    b.close()
    for cid in (victim_id,):  # end the persistent session
        p = door.probe("dev-a", client_id=cid, clean=True)
        p.connect()
        p.close()


def test_revocation_closes_a_live_connection_within_seconds(door: Door) -> None:
    c = door.probe("dev-c")
    assert c.connect()
    assert c.publish("devices/dev-c/telemetry", telemetry("dev-c", 3.0))
    t0 = time.monotonic()
    door.registry.revoke_certificate(door.certs["dev-c"].serial, actor="test", reason="key compromise")
    if door.kind == "mosquitto":  # what 'fieldmesh ca revoke' does beside the registry
        door.ca.revoke(door.certs["dev-c"])
        door.ca.write_crl(door.up.data_dir / "ca" / "crl.pem")
    deadline = t0 + 15
    while c.disconnected_at is None:
        assert time.monotonic() < deadline, f"dev-c is still connected 15 s after its revocation\n{door.up.tail()}"
        time.sleep(0.01)
    took = c.disconnected_at - t0
    print(f"\n{door.kind} door: revoked certificate's connection closed {took:.2f} s after the revocation")
    assert took < 10
    c.close()
    again = door.probe("dev-c")
    deadline = time.monotonic() + 20
    while True:  # a Mosquitto door may still be restarting: retry until it answers
        ok = again.connect()
        if again.connack is not None or again.error is None or time.monotonic() > deadline:
            break
        again.close()
        time.sleep(0.5)
        again = door.probe("dev-c")
    assert not ok, "the revoked certificate is let in again"
    again.close()
    door.barrier()


def test_beyond_loopback_without_client_certificates_refuses_to_start(door: Door, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(tmp_path / "d"), "--mqtt-port", "0",
            "--http-port", "0", "--door", door.kind, "--mqtt-host", "0.0.0.0"]
    server = door.ca.server()
    for extra in ([], ["--mqtt-tls-cert", str(server.cert_path), "--mqtt-tls-key", str(server.key_path),
                       "--mqtt-tls-port", str(free_port())]):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "--mqtt-host 0.0.0.0" in r.stderr and "--require-client-cert" in r.stderr, r.stderr


def test_tls_1_2_is_taken(door: Door) -> None:
    """The control of the TLS 1.1 refusal: the same client context capped at 1.2 gets in."""
    p = door.probe("dev-a", max_version=ssl.TLSVersion.TLSv1_2)
    assert p.connect(), (p.connack, p.error)
    p.close()


@pytest.mark.parametrize("kind", ["nats", "mosquitto"])
def test_tls_without_client_certificates_on_loopback(kind: str, tmp_path: Path) -> None:
    """Server-authenticated TLS: anonymous devices over TLS, confined to device topics as in local-only mode."""
    ca = CA(tmp_path / "pki", "root")
    server = ca.server()
    tls_port = free_port()
    up = Up(tmp_path / "data", "--door", kind, "--mqtt-tls-port", str(tls_port), "--mqtt-tls-cert",
            str(server.cert_path), "--mqtt-tls-key", str(server.key_path)).start()
    try:
        assert "door: TLS on 127.0.0.1:" in " ".join(up.tail().split())
        plain = Probe(tls_port)
        assert not plain.connect()  # plaintext on the TLS port
        plain.close()
        dev = f"tls-{uuid.uuid4().hex[:6]}"
        p = Probe(tls_port, tls_context(ca.cert_path))
        assert p.connect(), (p.connack, p.error)
        assert p.subscribe("#")[0] == (128 if kind == "nats" else 1)
        assert p.publish(f"devices/{dev}/telemetry", telemetry(dev, 4.0))
        p.close()
        up.wait_for(lambda s: s["received"] >= 1)
    finally:
        assert up.stop() == 0, up.tail()
