"""The same exactness against an external MQTT 5 broker (the Mosquitto on 127.0.0.1:1883)."""

from __future__ import annotations

import re
import socket
import uuid
from pathlib import Path

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from e2e.test_up import check_exact
from fmtest.mqtt import assert_sessions_gone, end_session
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


def test_external_mqtt5_broker_with_shared_subscription_and_kill9(tmp_path: Path, mosquitto):
    prefix = f"ext{uuid.uuid4().hex[:6]}"
    env = {"FIELDMESH__GATEWAY__SHARE_GROUP": f"g{prefix}"}
    stream = make_stream(prefix, devices=8, per_device=100, seed=3)
    msgs = stream["messages"]
    half = len(msgs) // 2
    up = Up(tmp_path / "data", "--mqtt-url", f"mqtt://{mosquitto[0]}:{mosquitto[1]}", env=env).start()
    c = publisher(mosquitto[1], v5=True)
    publish_all(c, msgs[:half])
    up.kill9()
    # While the gateway is down, its persistent session at the broker queues what devices send.
    publish_all(c, msgs[half:])
    up2 = Up(tmp_path / "data", "--mqtt-url", f"mqtt://{mosquitto[0]}:{mosquitto[1]}", env=env)
    up2.http_port = up.http_port
    up2.start()
    try:
        bad, good_in_bad = malformed(prefix)
        publish_all(c, bad)
        check_exact(up2, stream["sent"] + good_in_bad, MALFORMED_REASONS)
    finally:
        c.disconnect()
        assert up2.stop() == 0, up2.tail()
        # The gateway's session is persistent by design (it queued the messages above while the
        # gateway was down): remove it, or the shared broker queues devices/+/telemetry for it forever.
        log = (tmp_path / "data" / "logs" / "gateway.log").read_text()
        ids = sorted(set(re.findall(r"gateway connected to MQTT \S+ as (\S+) ", log)))
        assert ids, log[-2000:]
        assert all(end_session(i, *mosquitto) for i in ids)  # it was there, and now it is gone
        assert_sessions_gone([*ids, c._client_id.decode()], *mosquitto)
