"""Modbus TCP source against a real pymodbus server started by the test."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from conftest import free_port
from fieldmesh.edge.config import ModbusSourceConfig
from fieldmesh.edge.sources.modbus import ModbusSource

pytestmark = pytest.mark.integration


async def _server(port: int, regs: list[int]) -> tuple[Any, asyncio.Task[Any]]:
    from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
    from pymodbus.server import ModbusTcpServer

    ctx = ModbusServerContext(devices=ModbusDeviceContext(hr=ModbusSequentialDataBlock(1, regs)), single=True)
    server = ModbusTcpServer(ctx, address=("127.0.0.1", port))
    task = asyncio.create_task(server.serve_forever())
    for _ in range(100):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    return server, task


async def _take(it: Any, n: int, timeout: float = 10) -> list[Any]:
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(it))
    return out


def test_modbus_scaling_outage_and_recovery() -> None:
    async def main() -> None:
        port = free_port()
        f_hi, f_lo = struct.unpack(">HH", struct.pack(">f", 101.25))
        # pymodbus data blocks are 1-based: block address 1 is protocol address 0
        regs = [struct.unpack(">H", struct.pack(">h", -215))[0], 7, f_hi, f_lo, 0, 0]
        server, task = await _server(port, regs)
        cfg = ModbusSourceConfig.model_validate(
            {
                "port": port,
                "device_id": "boiler-1",
                "interval_ms": 50,
                "timeout_s": 0.3,
                "registers": {
                    "temperature": {"address": 0, "type": "int16", "scale": 0.1},
                    "level": {"address": 1, "type": "uint16", "scale": 2, "offset": 1},
                    "pressure": {"address": 2, "type": "float32"},
                },
            }
        )
        src = ModbusSource(cfg)
        it = src.batches().__aiter__()
        got = await _take(it, 3)
        b = got[-1]
        assert b.device_ids == ["boiler-1"]
        assert b.cols["temperature"][0] == pytest.approx(-21.5)
        assert b.cols["level"][0] == 15.0
        assert b.cols["pressure"][0] == pytest.approx(101.25)
        # the device stops answering: the source keeps going, counts errors, makes nothing up
        await server.shutdown()
        task.cancel()
        nxt = asyncio.ensure_future(anext(it))
        await asyncio.sleep(1.0)
        assert not nxt.done()
        assert src.errors >= 1 and not src.healthy
        # it comes back on the same port: readings resume
        server, task = await _server(port, regs)
        b = await asyncio.wait_for(nxt, 10)
        assert b.cols["temperature"][0] == pytest.approx(-21.5)
        assert src.healthy
        await src.close()
        await server.shutdown()
        task.cancel()

    asyncio.run(main())
