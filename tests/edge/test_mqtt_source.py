"""Local MQTT source -> agent -> uplink, against private brokers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import wait_for

pytestmark = pytest.mark.integration


def test_local_mqtt_devices_through_the_agent(
    tmp_path: Path, mosquitto_factory: Any, collector_factory: Any, agent_factory: Any, prefix: str
) -> None:
    local = mosquitto_factory()
    cloud = mosquitto_factory()
    coll = collector_factory(cloud.port, prefix)
    agent = agent_factory(
        {
            "agent": {"stats_interval_s": 0.2},
            "sources": [{"mqtt": {"port": local.port, "topic": "local/+/telemetry"}}],
            "preprocess": {"metrics": {"temperature": {"unit": "F->C"}}},
            "infer": {"scorer": "none"},
            "buffer": {"path": str(tmp_path / "buf")},
            "uplink": {"port": cloud.port, "linger_ms": 50},
            "twin": {"enabled": False},
        }
    )
    agent.start()
    wait_for(lambda: agent.stats().get("uplink", {}).get("connects") == 1, 20, "agent up")
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", local.port)
    pub.loop_start()
    dev = f"{prefix}-m"
    t0 = int(time.time() * 1000)
    time.sleep(1.0)  # let the agent's subscription settle
    for i in range(20):
        body: dict[str, Any] = {
            "device_id": dev,
            "ts": t0 + i,
            "measurements": {"temperature": 212.0 if i % 2 else 32.0},
        }
        if i % 2 == 0:  # the device's own identity is kept
            body |= {"seq": 1000 + i, "boot_id": "devboot"}
        pub.publish(f"local/{dev}/telemetry", json.dumps(body), qos=1).wait_for_publish(5)
    pub.publish(f"local/{dev}/telemetry", b"{not json", qos=1).wait_for_publish(5)
    wait_for(lambda: coll.count() >= 20, 20, "readings forwarded")
    got = sorted((r["ts"], r["measurements"]["temperature"]) for _, r in coll.readings)
    assert got == [(t0 + i, 100.0 if i % 2 else 0.0) for i in range(20)]
    ids = {r["ts"] - t0: (r["boot_id"], r["seq"]) for _, r in coll.readings}
    assert all(ids[i] == ("devboot", 1000 + i) for i in range(0, 20, 2))
    agent_ids = [ids[i] for i in range(1, 20, 2)]
    assert all(b != "devboot" for b, _ in agent_ids) and len(set(agent_ids)) == 10
    pub.loop_stop()
    assert agent.stop() == 0
