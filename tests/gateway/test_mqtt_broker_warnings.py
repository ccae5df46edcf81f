"""The MQTT source tells the broker its Receive Maximum and warns about what limits bursts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fieldmesh.gateway.sources import MqttSource
from fieldmesh.runtime.natsserver import EmbeddedNats, free_port
from fmtest.mqtt import PrivateMosquitto, end_session

pytestmark = pytest.mark.integration


async def _start(url: str, **kw: object) -> MqttSource:
    src = MqttSource(url, client_id=f"warn-{free_port()}", session_expiry_s=0, **kw)  # type: ignore[arg-type]
    await src.start()
    await asyncio.sleep(0.3)  # the SUBACK
    return src


def test_stock_mosquitto_is_named_and_the_window_is_ours(tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path / "m")
    try:
        async def run() -> tuple[MqttSource, list[str]]:
            src = await _start(broker.url)
            w = src.warnings()
            await src.close()
            return src, w

        src, warnings = asyncio.run(run())
        assert src.protocol == "5" and src.broker["broker_receive_maximum"] == 20
        assert any("Receive Maximum 20" in w and "max_queued_messages" in w for w in warnings), warnings
        assert not src.broker["refused_subscriptions"]
        assert not end_session(src.client_id, port=broker.port)  # session expiry 0: nothing left behind
    finally:
        broker.stop()


def test_a_broker_without_mqtt5_is_named(tmp_path: Path) -> None:
    port = free_port()
    nats = EmbeddedNats(store_dir=tmp_path / "nats", mqtt_port=port)
    nats.start()
    try:
        async def run() -> tuple[MqttSource, list[str]]:
            src = await _start(f"mqtt://127.0.0.1:{port}")
            w = src.warnings()
            await src.close()
            return src, w

        src, warnings = asyncio.run(run())
        assert src.protocol == "3.1.1"
        assert any("refused MQTT 5" in w and "shared subscription" in w for w in warnings), warnings
    finally:
        nats.stop()


def test_receive_maximum_out_of_range_is_a_config_error() -> None:
    from fieldmesh.core.errors import ConfigError

    with pytest.raises(ConfigError, match="receive maximum"):
        MqttSource("mqtt://127.0.0.1:1", receive_maximum=0)
