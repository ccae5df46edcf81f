"""Modbus TCP source (pymodbus): poll registers, scale them, survive a device that stops answering."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import numpy as np

from fieldmesh.core.errors import MissingDependency
from fieldmesh.edge.config import ModbusRegister, ModbusSourceConfig
from fieldmesh.edge.sources.base import SourceBatch

__all__ = ["ModbusSource", "decode_registers"]

log = logging.getLogger("fieldmesh.edge.modbus")

_WIDTH: Final = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


def decode_registers(regs: list[int], reg: ModbusRegister) -> float:
    """One metric's value from its 16-bit registers (big-endian words), scaled."""
    import struct

    if reg.type == "uint16":
        raw: float = regs[0]
    elif reg.type == "int16":
        raw = struct.unpack(">h", struct.pack(">H", regs[0]))[0]
    else:
        b = struct.pack(">HH", regs[0], regs[1])
        raw = struct.unpack({"int32": ">i", "uint32": ">I", "float32": ">f"}[reg.type], b)[0]
    return float(raw) * reg.scale + reg.offset


class ModbusSource:
    """Polls one Modbus TCP device every ``interval_ms``.

    Registers of one kind are read in one request when they span at most 125 registers. A device that
    stops answering is logged once, counted in ``errors``, and polled again with capped backoff; no
    reading is made up for the gap. Polling has nothing to acknowledge: ``ack`` is a no-op.
    """

    def __init__(self, cfg: ModbusSourceConfig, *, name: str = "modbus") -> None:
        try:
            from pymodbus.client import AsyncModbusTcpClient
        except ImportError as exc:
            raise MissingDependency("pymodbus", "edge-modbus") from exc
        self.name = name
        self.cfg = cfg
        self._client: Any = AsyncModbusTcpClient(
            cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0, reconnect_delay=0
        )
        self.errors = 0
        self.polls = 0
        self.healthy = True
        self._closed = False
        self._names = list(cfg.registers)

    async def _read_kind(self, kind: str, regs: dict[str, ModbusRegister]) -> dict[str, float]:
        lo = min(r.address for r in regs.values())
        hi = max(r.address + _WIDTH[r.type] for r in regs.values())
        fn = self._client.read_holding_registers if kind == "holding" else self._client.read_input_registers
        out: dict[str, float] = {}
        if hi - lo <= 125:
            rr = await fn(lo, count=hi - lo, device_id=self.cfg.unit)
            if rr.isError():
                raise ConnectionError(f"modbus error response: {rr}")
            for name, r in regs.items():
                off = r.address - lo
                out[name] = decode_registers(rr.registers[off : off + _WIDTH[r.type]], r)
        else:
            for name, r in regs.items():
                rr = await fn(r.address, count=_WIDTH[r.type], device_id=self.cfg.unit)
                if rr.isError():
                    raise ConnectionError(f"modbus error response: {rr}")
                out[name] = decode_registers(rr.registers, r)
        return out

    async def poll(self) -> dict[str, float]:
        """One poll of every register; raises ``ConnectionError``/``TimeoutError`` when it fails."""
        if not self._client.connected:
            ok = await self._client.connect()
            if not ok:
                raise ConnectionError(f"cannot connect to {self.cfg.host}:{self.cfg.port}")
        by_kind: dict[str, dict[str, ModbusRegister]] = {}
        for name, r in self.cfg.registers.items():
            by_kind.setdefault(r.kind, {})[name] = r
        values: dict[str, float] = {}
        for kind, regs in by_kind.items():
            values.update(await self._read_kind(kind, regs))
        return values

    async def batches(self) -> AsyncIterator[SourceBatch]:
        """One reading per successful poll."""
        interval = self.cfg.interval_ms / 1000
        backoff = interval
        next_t = time.monotonic()
        while not self._closed:
            try:
                from pymodbus.exceptions import ModbusException

                values = await asyncio.wait_for(self.poll(), timeout=self.cfg.timeout_s * 2)
            except (ConnectionError, TimeoutError, OSError, ModbusException) as exc:
                self.errors += 1
                if self.healthy:
                    log.warning(
                        "modbus %s (%s:%s) stopped answering: %s",
                        self.cfg.device_id,
                        self.cfg.host,
                        self.cfg.port,
                        exc,
                    )
                self.healthy = False
                self._client.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max(interval, 5.0))
                next_t = time.monotonic()
                continue
            if not self.healthy:
                log.info("modbus %s answers again", self.cfg.device_id)
            self.healthy = True
            backoff = interval
            self.polls += 1
            ts = int(time.time() * 1000)
            yield SourceBatch(
                device_ids=[self.cfg.device_id],
                ts_ms=np.array([ts], dtype=np.int64),
                cols={k: np.array([values[k]]) for k in self._names},
            )
            next_t += interval
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    async def ack(self, batch: SourceBatch) -> None:
        """Nothing to acknowledge to a polled device."""

    async def close(self) -> None:
        """Stop polling and close the connection."""
        self._closed = True
        self._client.close()
