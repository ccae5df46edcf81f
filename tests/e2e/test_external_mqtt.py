"""The same exactness against an external MQTT 5 broker (the Mosquitto on 127.0.0.1:1883)."""

from __future__ import annotations

import re
import socket
import time
import uuid
from pathlib import Path

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from fmtest.mqtt import assert_sessions_gone, check_stored_once, end_session
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration
BROKER = ("127.0.0.1", 1883)


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError as exc:  # in CI a missing service fails the run
        pytest.fail(f"the MQTT broker at {BROKER} is not running: {exc}")
    return BROKER


def _gateway_client_ids(data_dir: Path) -> list[str]:
    """The MQTT client ids the gateway of ``up`` on ``data_dir`` connected with (from its log)."""
    log = data_dir / "logs" / "gateway.log"
    text = log.read_text() if log.exists() else ""
    return sorted(set(re.findall(r"gateway connected to MQTT \S+ as (\S+) ", text)))


def _wait_gateway_subscribed(data_dir: Path, starts: int, timeout_s: float = 60) -> None:
    """Wait until the gateway of the ``starts``-th ``up`` on ``data_dir`` has its subscription (its log says
    "gateway running" after the SUBACK). ``/health`` is ok before that: a message published earlier has
    no subscriber at the broker yet (no session on a first start) and the broker drops it."""
    log = data_dir / "logs" / "gateway.log"
    deadline = time.monotonic() + timeout_s
    while (log.read_text() if log.exists() else "").count("gateway running") < starts:
        assert time.monotonic() < deadline, f"no gateway subscribed within {timeout_s}s"
        time.sleep(0.1)


def test_external_mqtt5_broker_with_shared_subscription_and_kill9(tmp_path: Path, mosquitto):
    prefix = f"ext{uuid.uuid4().hex[:6]}"
    env = {"FIELDMESH__GATEWAY__SHARE_GROUP": f"g{prefix}"}
    stream = make_stream(prefix, devices=8, per_device=100, seed=3)
    msgs = stream["messages"]
    half = len(msgs) // 2
    c = publisher(mosquitto[1], v5=True)
    up2: Up | None = None
    try:
        up = Up(tmp_path / "data", "--mqtt-url", f"mqtt://{mosquitto[0]}:{mosquitto[1]}", env=env).start()
        _wait_gateway_subscribed(tmp_path / "data", 1)
        publish_all(c, msgs[:half])
        up.kill9()
        # While the gateway is down, its persistent session at the broker queues what devices send.
        publish_all(c, msgs[half:])
        up2 = Up(tmp_path / "data", "--mqtt-url", f"mqtt://{mosquitto[0]}:{mosquitto[1]}", env=env)
        up2.http_port = up.http_port
        up2.start()
        _wait_gateway_subscribed(tmp_path / "data", 2)
        bad, good_in_bad = malformed(prefix)
        publish_all(c, bad)
        # kill -9 with up to Receive Maximum messages in the gateway: those come again, as duplicates
        check_stored_once(up2, stream["sent"] + good_in_bad, MALFORMED_REASONS)
        assert up2.stop() == 0, up2.tail()
        ids = _gateway_client_ids(tmp_path / "data")
        assert len(ids) == 1  # one stable id across the restart: the broker kept its session
        # The session is persistent by design: remove it, or the shared broker queues every device's
        # messages for it for a day. CONNACK of the removal says it was there.
        assert end_session(ids[0], *mosquitto)
    finally:
        c.disconnect()
        if up2 is not None:
            up2.stop()
        for cid in _gateway_client_ids(tmp_path / "data"):
            end_session(cid, *mosquitto)
        assert_sessions_gone([*_gateway_client_ids(tmp_path / "data"), c._client_id.decode()], *mosquitto)
