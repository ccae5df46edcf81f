"""Enrichment wiring: topics of joins, the processor's enricher, and the lock shared with the follower."""

from __future__ import annotations

import sys
import threading

from fieldmesh.bus.base import BusRecord
from fieldmesh.cdc.base import ChangeEvent, SourceInfo, encode_change_event
from fieldmesh.core.codec import encode_bus_batch
from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings, load_settings, parse_enrich_spec
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.runtime.enrichment import build_enrichment, join_topic, source_database
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor

T = 1_763_800_000_000


def change(op: str, ts_ms: int, lsn: int, after: dict[str, object], seq: int) -> BusRecord:
    src = SourceInfo(connector="postgresql", db="plant", schema="public", table="assets", ts_ms=ts_ms, lsn=lsn,
                     snapshot="true" if op == "r" else "false")
    ev = ChangeEvent(op=op, source=src, ts_ms=ts_ms + 3, before=None, after=after)
    return BusRecord(topic="fm.cdc.plant.public.assets", partition=0, offset=seq, value=encode_change_event(ev),
                     key=f'{{"id":{after["id"]}}}'.encode())


def reading(dev: str, ts_ms: int) -> Reading:
    m = {"vib": 2.0}
    key, chk = identity_digest(identity_string(dev, ts_ms, m, seq=None))
    return Reading(dev, ts_ms, m, key, chk, received_ms=ts_ms)


def test_topics_of_joins() -> None:
    assert source_database("postgresql://u:p@h:5432/plant?sslmode=require") == "plant"
    assert source_database("postgresql://cdc@h") == "cdc"
    assert source_database("mysql://root@h:3306/shop") is None
    pg = parse_enrich_spec("public.assets")
    assert join_topic(pg, "plant") == "fm.cdc.plant.public.assets"
    assert join_topic(parse_enrich_spec("other.public.assets"), "plant") == "fm.cdc.other.public.assets"
    assert join_topic(parse_enrich_spec("shop.assets"), None) == "fm.cdc.shop.assets"  # MySQL db.table
    assert join_topic(parse_enrich_spec("public.assets:topic=dbz.public.assets"), "plant") == "dbz.public.assets"


def test_no_joins_no_enrichment() -> None:
    assert build_enrichment(load_settings()) is None


def test_processor_stores_the_row_valid_at_event_time(tmp_path) -> None:
    settings = load_settings(enrich={"joins": "public.assets:fields=threshold:pk=id", "database": "plant"})
    enrichment = build_enrichment(settings)
    assert enrichment is not None and enrichment.topics == ["fm.cdc.plant.public.assets"]
    applied = enrichment.enricher.apply_change_events([
        change("r", T - 10_000, 10, {"id": 1, "device_id": "p1", "threshold": 4.0, "site": "n"}, 1),
        change("u", T, 20, {"id": 1, "device_id": "p1", "threshold": 5.5, "site": "n"}, 2),
    ])
    assert applied == 2
    store = SqliteStore(f"sqlite:///{tmp_path / 's.db'}")
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     enricher=enrichment.enricher)
    batch = BusBatch([reading("p1", T - 1), reading("p1", T), reading("p2", T)])
    proc.apply_records([BusRecord(topic=READINGS_TOPIC, partition=0, offset=1, value=encode_bus_batch(batch))])
    rows = {(r["device_id"], r["ts_ms"]): r.get("enrichment")
            for r in store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=10)}
    assert rows == {("p1", T - 1): {"assets.threshold": 4.0}, ("p1", T): {"assets.threshold": 5.5},
                    ("p2", T): None}
    # a later change does not touch what was stored
    enrichment.enricher.apply_change_events([
        change("u", T - 5, 15, {"id": 1, "device_id": "p1", "threshold": 9.0, "site": "n"}, 3)])
    again = {(r["device_id"], r["ts_ms"]): r.get("enrichment")
             for r in store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=10)}
    assert again == rows
    store.close()


def test_follower_and_processor_threads_never_see_a_half_applied_version() -> None:
    enrichment = build_enrichment(load_settings(enrich={"joins": "public.assets:fields=v:pk=id",
                                                        "database": "plant"}))
    assert enrichment is not None
    guarded = enrichment.enricher
    n_keys, n_versions = 50, 40
    # version k of every key is valid from T + k*1000 and carries v == k; the newest arrive first (as after
    # a redelivery), so each later event inserts at the front of the versions
    events = [change("u", T + k * 1000, k * 100 + i, {"id": i, "device_id": f"d{i}", "v": k}, k * 100 + i)
              for k in reversed(range(n_versions)) for i in range(n_keys)]
    errors: list[BaseException] = []
    done = threading.Event()

    def enrich_all_the_time() -> None:
        try:
            while not done.is_set():
                rs = [reading(f"d{i}", T + k * 1000 + 500) for i in range(n_keys) for k in range(n_versions)]
                for r in guarded.enrich(rs):
                    if r.enrichment is not None:  # not applied yet (None), else exactly that version
                        assert r.enrichment["assets.v"] == (r.ts_ms - T) // 1000
        except BaseException as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show at once
    try:
        t = threading.Thread(target=enrich_all_the_time)
        t.start()
        for j in range(0, len(events), 7):
            guarded.apply_change_events(events[j : j + 7])
        done.set()
        t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    out = guarded.enrich([reading(f"d{i}", T + k * 1000) for i in range(n_keys) for k in range(n_versions)])
    assert [r.enrichment for r in out] == [{"assets.v": k} for _ in range(n_keys) for k in range(n_versions)]
