"""Simulated devices publishing over MQTT, as real devices would (own process).

``python -m fieldmesh.runtime.devices --mqtt-url mqtt://127.0.0.1:1883 --devices 100``
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import msgspec

from fieldmesh.core.topics import telemetry_topic
from fieldmesh.edge.simulator import METRICS, FleetSimulator

__all__ = ["MqttPublisher", "run_fleet"]

log = logging.getLogger("fieldmesh.devices")
_enc = msgspec.json.Encoder()


class MqttPublisher:
    """A paho client that publishes QoS 0/1 messages, MQTT 5 first, else 3.1.1."""

    def __init__(self, url: str, *, client_id: str | None = None, max_inflight: int = 1000) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        u = urlparse(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 1883
        last: Exception | None = None
        for proto in (mqtt.MQTTv5, mqtt.MQTTv311):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=proto,
                            client_id=client_id or f"fm-sim-{uuid.uuid4().hex[:8]}")
            c.max_inflight_messages_set(max_inflight)
            ok = threading.Event()
            failed: list[str] = []

            def on_connect(cl: Any, ud: Any, fl: Any, rc: Any, pr: Any = None,
                           ok: threading.Event = ok, failed: list[str] = failed) -> None:
                if rc.is_failure:
                    failed.append(str(rc))
                ok.set()

            c.on_connect = on_connect
            try:
                c.connect(self.host, self.port, keepalive=30)
            except OSError as exc:
                raise ConnectionError(f"cannot reach MQTT broker {self.host}:{self.port}: {exc}") from exc
            c.loop_start()
            if ok.wait(10) and not failed:
                self.client = c
                self.protocol = "5" if proto == mqtt.MQTTv5 else "3.1.1"
                return
            c.loop_stop()
            last = ConnectionError(f"MQTT connect refused: {failed or 'timeout'}")
        raise last or ConnectionError("MQTT connect failed")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Any:
        """Publish; returns paho's MQTTMessageInfo (wait_for_publish() for the PUBACK)."""
        while True:
            info = self.client.publish(topic, payload, qos=qos)
            if info.rc == 0:
                return info
            time.sleep(0.001)  # queue full: let the network loop drain

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def run_fleet(
    *,
    mqtt_url: str,
    devices: int,
    rate_hz: float = 1.0,
    per_message: int = 1,
    duration_s: float | None = None,
    qos: int = 1,
    seed: int = 0,
    stop: threading.Event | None = None,
) -> int:
    """Publish simulated readings until ``duration_s`` passed or ``stop`` is set; return readings sent.

    Every device sends ``rate_hz`` readings per second, ``per_message`` readings per MQTT message.
    """
    sim = FleetSimulator(devices=devices, seed=seed)
    pub = MqttPublisher(mqtt_url)
    boot = uuid.uuid4().hex[:12]
    topics = [telemetry_topic(d) for d in sim.device_ids]
    pending: list[list[dict[str, Any]]] = [[] for _ in sim.device_ids]
    seq = 0
    sent = 0
    period = 1.0 / rate_hz
    t_end = time.monotonic() + duration_s if duration_s else None
    next_t = time.monotonic()
    last = None
    try:
        while not (stop and stop.is_set()) and (t_end is None or time.monotonic() < t_end):
            now_ms = int(time.time() * 1000)
            tick = sim.tick(now_ms)
            cols = [tick.values[m].tolist() for m in METRICS]
            for i, dev in enumerate(sim.device_ids):
                pending[i].append({"ts": now_ms, "seq": seq, "boot_id": boot,
                                   "measurements": {m: cols[k][i] for k, m in enumerate(METRICS)}})
                if len(pending[i]) >= per_message:
                    body = (
                        {"device_id": dev, **pending[i][0]} if per_message == 1
                        else {"device_id": dev, "readings": pending[i]}
                    )
                    last = pub.publish(topics[i], _enc.encode(body), qos=qos)
                    sent += len(pending[i])
                    pending[i] = []
            seq += 1
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -5 * period:
                next_t = time.monotonic()  # falling behind: do not burst to catch up
        if last is not None and qos > 0:
            last.wait_for_publish(30)
    finally:
        pub.close()
    return sent


def main() -> None:
    """CLI entry of the simulator process."""
    p = argparse.ArgumentParser(description="simulated fieldmesh devices")
    p.add_argument("--mqtt-url", required=True)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rate", type=float, default=1.0, help="readings per second per device")
    p.add_argument("--per-message", type=int, default=1)
    p.add_argument("--for", dest="duration", type=float, default=None)
    p.add_argument("--qos", type=int, default=1, choices=(0, 1))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        n = run_fleet(mqtt_url=a.mqtt_url, devices=a.devices, rate_hz=a.rate, per_message=a.per_message,
                      duration_s=a.duration, qos=a.qos, seed=a.seed)
    except KeyboardInterrupt:
        return
    log.info("sent %d readings", n)


if __name__ == "__main__":
    main()
