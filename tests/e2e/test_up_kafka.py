"""``fieldmesh up --bus-url kafka://...``: the embedded MQTT door feeds the gateway, readings go to Kafka."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from e2e.dataset import make_stream
from fmtest import oracle
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration


def test_up_with_a_kafka_bus_is_exact(tmp_path: Path, tansu_url: str) -> None:
    prefix = f"uk{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=6, per_device=50, seed=4)
    up = Up(tmp_path / "data", "--bus-url", tansu_url).start()
    try:
        h = up.get("/health")
        assert h["door"] == "ok" and h["gateway"] == "ok" and h["processor"] == "ok", h
        c = publisher(up.mqtt_port)
        publish_all(c, stream["messages"])
        uniq = oracle.unique_readings(stream["sent"])
        stats = up.wait_for(lambda s: s["stored"] >= len(uniq), timeout_s=60)
        assert stats["stored"] == len(uniq), stats
        assert stats["received"] == len(stream["sent"]), stats
        assert set(stats["lag"]) >= {"gateway", "processor"}, stats
        # per partition: the gateway's on the embedded door (NATS), the processor's on Kafka from the store's
        # positions (tansu reports high watermarks per record batch, so that figure is only a hint here)
        parts = up.wait_for(lambda s: sum(s["lag_partitions"]["processor"].values()) == 0)["lag_partitions"]
        assert parts["gateway"] == {"0": 0} and len(parts["processor"]) >= 1, parts
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
    log = (tmp_path / "data-up.log").read_text(errors="replace")
    assert "exited" not in log, log  # no restart loop
