"""The follower rebuilds as-of state from CDC topics before enrichment starts, then keeps it current."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fieldmesh.bus import load_bus
from fieldmesh.bus.nats import NatsBus
from fieldmesh.cdc.base import Change, ChangeEvent, SourceInfo, cdc_topic, encode_key
from fieldmesh.cdc.follow import CdcFollower
from fieldmesh.cdc.sink import CdcSink
from fieldmesh.core.model import Reading
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.stream.enrich import AsOfEnricher, AsOfJoin

pytestmark = pytest.mark.integration

T = 1_763_800_000_000
TOPIC = cdc_topic("plant", "public", "assets")


def change(i: int, op: str, ts: int, vib_max: float) -> Change:
    after = {"id": i, "device_id": f"pump-{i}", "vib_max": vib_max}
    src = SourceInfo(
        connector="postgresql", db="plant", schema="public", table="assets", ts_ms=ts, lsn=ts - T + i
    )
    return Change(
        TOPIC,
        encode_key(after, ("id",)),
        f"t:{ts}:{i}",
        ChangeEvent(op=op, source=src, ts_ms=ts, after=after),
    )


def test_catch_up_then_follow(tmp_path: Path) -> None:
    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()

    async def scenario() -> None:
        async with load_bus(srv.url) as bus:
            sink = CdcSink(bus, partitions=3)
            await sink.send([change(i, "r", T, 1.0) for i in range(300)])
            await sink.send([change(i, "u", T + 1000, 2.0) for i in range(0, 300, 2)])
            enr = AsOfEnricher([AsOfJoin(table="public.assets", fields=("vib_max",), pk_columns=("id",))])
            follower = CdcFollower(bus, enr, [TOPIC], fetch=100)
            assert await follower.catch_up(timeout_s=20) == 450
            out = enr.enrich(
                [
                    Reading(device_id="pump-0", ts_ms=T + 5000, measurements={"v": 1.0}, key=1, chk=1),
                    Reading(device_id="pump-1", ts_ms=T + 5000, measurements={"v": 1.0}, key=2, chk=2),
                ]
            )
            assert [r.enrichment for r in out] == [{"vib_max": 2.0}, {"vib_max": 1.0}]
            stop = asyncio.Event()
            task = asyncio.create_task(follower.run(stop))
            await sink.send([change(1, "u", T + 2000, 3.0)])
            for _ in range(100):
                if follower.applied == 451:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await task
            assert enr.table("public.assets").lookup("pump-1", T + 2000) == {"vib_max": 3.0}
            await follower.close()
            assert isinstance(bus, NatsBus)
            names = [c.name async for c in _consumers(bus)]
            assert follower.group not in names

    async def _consumers(bus: NatsBus):  # type: ignore[no-untyped-def]
        for info in await bus.js.consumers_info("FM_CDC_PLANT_PUBLIC_ASSETS"):
            yield info

    try:
        asyncio.run(scenario())
    finally:
        srv.stop()
