"""End to end: an asset threshold updated in PostgreSQL at T enriches readings by their event time."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from cdc_helpers import pg_db_url, pg_exec, read_topic

from fieldmesh.bus import load_bus
from fieldmesh.cdc.base import cdc_topic
from fieldmesh.cdc.runner import run_cdc
from fieldmesh.core.model import Reading
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.stream.enrich import AsOfEnricher, AsOfJoin

pytestmark = pytest.mark.integration


def test_threshold_change_at_t_enriches_by_event_time(
    pg_db: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    pg_exec(
        pg_db,
        "CREATE TABLE public.assets (id int PRIMARY KEY, device_id text UNIQUE, model text, vib_max float8)",
        "INSERT INTO assets VALUES (1, 'pump-1', 'P100', 4.0), (2, 'pump-2', 'P200', 6.0)",
    )
    topic = cdc_topic(pg_db, "public", "assets")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_cdc(
                pg_db_url(pg_db), "public.assets", nats_server.url, state_dir=tmp_path, name="fme", stop=stop
            )
        )
        try:
            await read_topic(nats_server.url, topic, expect=2)
            pg_exec(pg_db, "UPDATE assets SET vib_max = 5.5 WHERE id = 1")
            evs = await read_topic(nats_server.url, topic, expect=3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        t_change = evs[-1].source.ts_ms  # commit time of the update: T

        enricher = AsOfEnricher(
            [
                AsOfJoin(
                    table="public.assets", fields=("model", "vib_max"), prefix="asset.", pk_columns=("id",)
                )
            ]
        )
        async with load_bus(nats_server.url) as bus:
            cons = await bus.consumer(topic, group=f"enrich_{uuid.uuid4().hex[:6]}")
            recs = await cons.fetch(100, 5.0)
            assert enricher.apply_change_events(recs) == 3
            await cons.ack(recs)
            await cons.close()

        # readings arrive after the change, their event times on both sides of T
        def r(dev: str, ts: int) -> Reading:
            return Reading(device_id=dev, ts_ms=ts, measurements={"vib": 5.0}, key=ts, chk=0)

        out = enricher.enrich(
            [
                r("pump-1", t_change - 1),
                r("pump-1", t_change),
                r("pump-1", t_change + 1),
                r("pump-2", t_change + 1),
            ]
        )
        assert [(x.enrichment or {}).get("asset.vib_max") for x in out] == [4.0, 5.5, 5.5, 6.0]
        assert all((x.enrichment or {}).get("asset.model") for x in out)

    asyncio.run(scenario())
