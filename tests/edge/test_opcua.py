"""OPC UA source against a real asyncua server started by the test, including a server restart."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from conftest import free_port
from fieldmesh.edge.config import OpcuaSourceConfig
from fieldmesh.edge.sources.opcua import OpcuaSource

pytestmark = pytest.mark.integration


async def _server(port: int) -> tuple[Any, dict[str, Any]]:
    from asyncua import Server

    logging.getLogger("asyncua").setLevel(logging.WARNING)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/fm/")
    idx = await server.register_namespace("urn:fieldmesh:test")
    obj = await server.nodes.objects.add_object(idx, "Pump")
    temp = await obj.add_variable(f"ns={idx};s=Pump.Temp", "Temp", 20.0)
    speed = await obj.add_variable(f"ns={idx};s=Pump.Speed", "Speed", 1500.0)
    await server.start()
    return server, {"temp": temp, "speed": speed, "ns": idx}


def test_opcua_subscription_and_server_restart() -> None:
    async def main() -> None:
        port = free_port()
        server, nodes = await _server(port)
        ns = nodes["ns"]
        cfg = OpcuaSourceConfig(
            endpoint=f"opc.tcp://127.0.0.1:{port}/fm/",
            device_id="press-4",
            nodes={"temperature": f"ns={ns};s=Pump.Temp", "speed": f"ns={ns};s=Pump.Speed"},
            publishing_interval_ms=50,
            reconnect_max_ms=500,
        )
        src = OpcuaSource(cfg)
        it = src.batches().__aiter__()
        seen: list[dict[str, float]] = []

        async def collect_until(pred: Any, timeout: float) -> None:
            async with asyncio.timeout(timeout):
                while not pred():
                    b = await anext(it)
                    for i in range(len(b)):
                        seen.append({k: float(v[i]) for k, v in b.cols.items() if v[i] == v[i]})

        await collect_until(lambda: any("temperature" in s for s in seen), 15)
        await nodes["temp"].write_value(42.5)
        await collect_until(lambda: any(s.get("temperature") == 42.5 for s in seen), 10)
        # the server restarts: the source reconnects and keeps delivering changes
        await server.stop()
        consumer = asyncio.ensure_future(
            collect_until(lambda: any(s.get("speed") == 900.0 for s in seen), 30)
        )
        await asyncio.sleep(1.0)
        server, nodes = await _server(port)
        for _ in range(60):
            if src.connects >= 2:
                break
            await asyncio.sleep(0.25)
        await nodes["speed"].write_value(900.0)
        await consumer
        assert src.connects >= 2 and src.errors >= 1
        await src.close()
        await server.stop()

    asyncio.run(main())
