"""The embedded bus of ``fieldmesh up`` is closed, in local-only mode on both doors: NATS clients without
the internal credentials are refused, the credentials stay off every command line, and anonymous MQTT
clients reach device topics only (a ``#`` subscription sees nothing internal, a publish on an internal
subject does not reach it)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats
import nats.errors
import pytest

from fieldmesh.bus import load_bus
from fmtest.door import Probe, telemetry
from fmtest.procs import Up

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["nats", "mosquitto"])
def up(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    d = tmp_path_factory.mktemp(f"bus-{request.param}") / "data"
    u = Up(d, "--door", request.param).start()
    try:
        yield u
    finally:
        assert u.stop() == 0, u.tail()


def _runtime(up: Up) -> dict[str, Any]:
    return dict(json.loads((up.data_dir / "runtime.json").read_text()))


def _stored(up: Up, device_id: str) -> int:
    with sqlite3.connect(f"file:{up.data_dir / 'store.db'}?mode=ro", uri=True, timeout=30) as con:
        return int(con.execute("SELECT count(*) FROM readings WHERE device_id = ?", (device_id,)).fetchone()[0])


def _wait_stored(up: Up, device_id: str, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _stored(up, device_id) < n:
        assert time.monotonic() < deadline, f"{device_id}: not stored in {timeout_s}s\n{up.tail()}"
        time.sleep(0.2)


def test_nats_without_credentials_is_refused(up: Up) -> None:
    u = urlparse(_runtime(up)["bus_url"])
    plain = f"nats://{u.hostname}:{u.port}"

    before = up.get("/stats")["door_refused"]["bus_authentication"]

    async def main() -> None:
        for url in (plain, f"nats://fm-internal:wrong@{u.hostname}:{u.port}",
                    f"nats://fm-device@{u.hostname}:{u.port}"):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)

    asyncio.run(main())
    # each refusal counted (from nats-server's log), in /stats and /metrics
    st = up.wait_for(lambda st: st["door_refused"]["bus_authentication"] >= before + 3, timeout_s=30)
    assert st["door_refused"]["bus_authentication"] == before + 3
    assert st["door_refused"]["total"] >= before + 3


def test_internal_credentials_work_and_stay_off_command_lines(up: Up) -> None:
    bus_url = _runtime(up)["bus_url"]
    auth_path = Path(urlparse(bus_url).query.removeprefix("auth_file="))
    assert auth_path.parent == up.data_dir.resolve() / "secrets"
    assert stat.S_IMODE(auth_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(auth_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((up.data_dir / "nats" / "nats-server.conf").stat().st_mode) == 0o600
    password = json.loads(auth_path.read_text())["password"]
    assert len(password) >= 32

    async def main() -> int:
        async with load_bus(bus_url) as bus:  # what a scale-out role given runtime.json's URL does
            return await bus.pending("fm.readings", group="fm-processor")

    assert asyncio.run(main()) >= 0
    seen = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(up.data_dir.resolve()).encode() in cmdline:
            seen += 1
            assert password.encode() not in cmdline, f"the internal password is on the command line of {pid}"
    assert seen >= 3  # up, nats-server, the gateway and processor (and Mosquitto) name the data dir
    for log in (up.data_dir / "logs").glob("*.log"):
        assert password not in log.read_text(errors="replace"), f"the internal password is in {log}"


def test_hash_subscription_sees_device_topics_only(up: Up) -> None:
    spy = Probe(up.mqtt_port)
    assert spy.connect(), spy.connack
    codes = spy.subscribe("#", "$JS/API/#", "fm/#", "$SYS/#", "$MQTT/#")
    nats_door = "--door" in up.extra and up.extra[up.extra.index("--door") + 1] == "nats"
    if nats_door:
        assert codes == [128] * 5  # refused outright: the listener maps them onto subjects the user lacks
    assert spy.subscribe("devices/#") in ([1], [0])
    dev = f"hash-{uuid.uuid4().hex[:6]}"
    pub = Probe(up.mqtt_port)
    assert pub.connect()
    assert pub.publish(f"devices/{dev}/telemetry", telemetry(dev, 1.0))
    _wait_stored(up, dev, 1)
    time.sleep(1.0)  # whatever internal traffic the stored reading caused has had time to reach the spy
    topics = {t for t, _ in spy.messages}
    assert f"devices/{dev}/telemetry" in topics
    assert all(t.startswith("devices/") for t in topics), topics
    spy.close()
    pub.close()


def test_publish_on_internal_subjects_does_not_reach_the_bus(up: Up) -> None:
    bus_url = _runtime(up)["bus_url"]
    dev, forged = f"intern-{uuid.uuid4().hex[:6]}", f"forged-{uuid.uuid4().hex[:6]}"
    got: list[bytes] = []

    u = urlparse(bus_url)
    creds = json.loads(Path(u.query.removeprefix("auth_file=")).read_text())

    async def on_msg(m: Any) -> None:
        got.append(m.data)

    async def main() -> None:
        nc = await nats.connect(f"nats://{u.hostname}:{u.port}", user=creds["user"], password=creds["password"])
        try:
            sub = await nc.subscribe("fm.readings.>", cb=on_msg)
            await nc.flush()
            pub = Probe(up.mqtt_port)
            assert pub.connect()
            for topic in ("fm/readings/0", "fm/dlq/0", "$JS/API/STREAM/PURGE/FM_READINGS"):
                pub.publish(topic, telemetry(forged, 9.0))
            assert pub.publish(f"devices/{dev}/telemetry", telemetry(dev, 2.0))  # the barrier
            pub.close()
            await asyncio.to_thread(_wait_stored, up, dev, 1)
            await asyncio.sleep(1.0)
            await sub.unsubscribe()
        finally:
            await nc.close()

    asyncio.run(main())
    assert got, "the barrier reading was not seen on fm.readings"
    assert not any(forged.encode() in m for m in got)
    assert _stored(up, forged) == 0
    assert up.get("/stats")["received"] >= 1


def test_door_logins_need_the_right_password(up: Up) -> None:
    """The Mosquitto door's password file (hashed by fieldmesh in Mosquitto's format) takes the internal user
    with its password only; the nats door takes no password login at all over MQTT."""
    auth = json.loads((up.data_dir / "secrets" / "internal.json").read_text())
    wrong = Probe(up.mqtt_port, user=auth["user"], password=auth["password"] + "x")
    assert not wrong.connect()
    wrong.close()
    right = Probe(up.mqtt_port, user=auth["user"], password=auth["password"])
    is_mosquitto = up.extra[up.extra.index("--door") + 1] == "mosquitto"
    assert right.connect() is is_mosquitto, right.connack  # the internal user is NATS-only at the nats door
    right.close()
