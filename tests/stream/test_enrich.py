"""As-of enrichment state: versions by commit time, deletes, key moves, redelivery, Debezium input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.bus.base import BusRecord
from fieldmesh.cdc.base import ChangeEvent, SourceInfo, encode_change_event
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.model import Reading
from fieldmesh.stream.enrich import AsOfEnricher, AsOfJoin, AsOfTable

T = 1_763_800_000_000


def ev(
    op: str,
    ts_ms: int,
    lsn: int,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    table: str = "assets",
) -> ChangeEvent:
    src = SourceInfo(
        connector="postgresql",
        db="shop",
        schema="public",
        table=table,
        ts_ms=ts_ms,
        lsn=lsn,
        snapshot="true" if op == "r" else "false",
    )
    return ChangeEvent(op=op, source=src, ts_ms=ts_ms + 5, before=before, after=after)


def reading(device: str, ts_ms: int, **enrichment: Any) -> Reading:
    return Reading(
        device_id=device,
        ts_ms=ts_ms,
        measurements={"vib": 1.0},
        key=ts_ms,
        chk=0,
        enrichment=enrichment or None,
    )


def asset(id_: int, device: str, threshold: float, site: str = "north") -> dict[str, Any]:
    return {"id": id_, "device_id": device, "threshold": threshold, "site": site}


def test_threshold_updated_at_t_enriches_by_event_time_even_when_readings_arrive_late() -> None:
    enr = AsOfEnricher(
        [AsOfJoin(table="public.assets", fields=("threshold", "site"), prefix="asset.", pk_columns=("id",))]
    )
    enr.apply(ev("r", T - 10_000, 100, after=asset(1, "pump-1", 5.0)))
    enr.apply(ev("u", T, 200, after=asset(1, "pump-1", 7.5)))  # threshold changes at T
    # readings arrive only now, after the change; their event times straddle T
    out = enr.enrich(
        [
            reading("pump-1", T - 1),
            reading("pump-1", T),
            reading("pump-1", T + 60_000),
            reading("pump-1", T - 86_400_000),
            reading("pump-9", T),
        ]
    )
    assert [r.enrichment for r in out] == [
        {"asset.threshold": 5.0, "asset.site": "north"},
        {"asset.threshold": 7.5, "asset.site": "north"},
        {"asset.threshold": 7.5, "asset.site": "north"},
        {"asset.threshold": 5.0, "asset.site": "north"},  # snapshot rows are valid since the beginning
        None,  # no asset for this device
    ]
    # a later change never rewrites how earlier readings are enriched
    enr.apply(ev("u", T + 120_000, 300, after=asset(1, "pump-1", 9.0)))
    again = enr.enrich(
        [reading("pump-1", T - 1), reading("pump-1", T + 60_000), reading("pump-1", T + 120_000)]
    )
    assert [r.enrichment["asset.threshold"] for r in again] == [5.0, 7.5, 9.0]  # type: ignore[index]
    assert enr.watermark_ms == T + 120_000


def test_delete_ends_validity_and_key_moves() -> None:
    t = AsOfTable(key_column="device_id", pk_columns=("id",))
    t.apply(ev("c", T, 1, after=asset(1, "pump-1", 1.0)))
    t.apply(ev("u", T + 10, 2, after=asset(1, "pump-2", 1.0)))  # the asset now serves another device
    t.apply(ev("d", T + 20, 3, before={"id": 1, "device_id": None, "threshold": None, "site": None}))
    assert t.lookup("pump-1", T - 1) is None
    assert t.lookup("pump-1", T + 5)["threshold"] == 1.0  # type: ignore[index]
    assert t.lookup("pump-1", T + 10) is None  # moved away at T+10
    assert t.lookup("pump-2", T + 15)["device_id"] == "pump-2"  # type: ignore[index]
    assert t.lookup("pump-2", T + 20) is None  # deleted (key-only old row: found through the primary key)
    assert t.unresolved == 0


def test_same_millisecond_commits_keep_commit_order_and_redelivery_is_idempotent() -> None:
    t = AsOfTable(key_column="device_id")
    e1 = ev("u", T, 10, after=asset(1, "d", 1.0))
    e2 = ev("u", T, 11, after=asset(1, "d", 2.0))
    for e in (e2, e1, e2, e1):  # out of order and twice
        t.apply(e)
    assert t.lookup("d", T)["threshold"] == 2.0  # type: ignore[index]
    assert len(t.versions("d")) == 2


def test_truncate_ends_every_row_and_int_keys_match_strings() -> None:
    t = AsOfTable(key_column="device_no", fields=("site",))
    t.apply(ev("c", T, 1, after={"id": 1, "device_no": 7, "site": "a"}))
    t.apply(ev("t", T + 5, 2))
    assert t.lookup("7", T + 1) == {"site": "a"}
    assert t.lookup(7, T + 5) is None


def test_compact_keeps_what_later_readings_can_see() -> None:
    t = AsOfTable(key_column="device_id")
    for i in range(5):
        t.apply(ev("u", T + i * 100, i, after=asset(1, "d", float(i))))
    assert t.compact(T + 250) == 2
    assert t.lookup("d", T + 250)["threshold"] == 2.0  # type: ignore[index]
    assert t.lookup("d", T + 450)["threshold"] == 4.0  # type: ignore[index]


def test_apply_bus_records_fieldmesh_and_debezium_shapes() -> None:
    enr = AsOfEnricher(
        [
            AsOfJoin(table="public.assets", fields=("threshold",)),
            AsOfJoin(
                table="inventory.meters",
                reading_field="meta.meter",
                column="serial",
                fields=("kind",),
                prefix="meter.",
            ),
        ]
    )
    ours = BusRecord(
        topic="fm.cdc.shop.public.assets",
        partition=0,
        offset=1,
        value=encode_change_event(ev("c", T, 1, after=asset(1, "pump-1", 3.0))),
        key=b'{"id":1}',
    )
    # what Debezium's MySQL connector writes with the JSON converter and schemas enabled
    debezium = {
        "schema": {
            "type": "struct",
            "fields": [],
            "optional": False,
            "name": "dbserver1.inventory.meters.Envelope",
        },
        "payload": {
            "before": None,
            "after": {"id": 9, "serial": "M-1", "kind": "flow"},
            "source": {
                "version": "2.7.0.Final",
                "connector": "mysql",
                "name": "dbserver1",
                "ts_ms": T - 1000,
                "snapshot": "false",
                "db": "inventory",
                "sequence": None,
                "table": "meters",
                "server_id": 223344,
                "gtid": None,
                "file": "mysql-bin.000003",
                "pos": 805,
                "row": 0,
                "thread": 7,
                "query": None,
            },
            "op": "c",
            "ts_ms": T - 900,
            "transaction": None,
        },
    }
    theirs = BusRecord(
        topic="dbserver1.inventory.meters",
        partition=0,
        offset=5,
        value=json.dumps(debezium).encode(),
        key=b'{"schema":{},"payload":{"id":9}}',
    )
    tombstone = BusRecord(topic="dbserver1.inventory.meters", partition=0, offset=6, value=b"")
    other = BusRecord(
        topic="x",
        partition=0,
        offset=7,
        value=encode_change_event(ev("c", T, 2, after={"id": 1}, table="orders")),
    )
    assert enr.apply_change_events([ours, theirs, tombstone, other]) == 3
    assert enr.ignored == 1
    r = Reading(
        device_id="pump-1",
        ts_ms=T + 1,
        measurements={"x": 1.0},
        key=1,
        chk=1,
        meta={"meter": "M-1"},
        enrichment={"kept": True},
    )
    (out,) = enr.enrich([r])
    assert out.enrichment == {"kept": True, "threshold": 3.0, "meter.kind": "flow"}


def test_bad_reading_field_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown reading field"):
        AsOfEnricher([AsOfJoin(table="public.assets", reading_field="nope")])


@settings(max_examples=200, deadline=None)
@given(
    changes=st.lists(
        st.tuples(
            st.sampled_from("cud"), st.integers(0, 50), st.sampled_from(["a", "b", "c"]), st.integers(0, 9)
        ),
        max_size=30,
    ),
    probes=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(-5, 60)), max_size=20),
    shuffle=st.randoms(use_true_random=False),
)
def test_lookup_matches_a_linear_oracle(
    changes: list[tuple[str, int, str, int]], probes: list[tuple[str, int]], shuffle: Any
) -> None:
    """Every (key, time) lookup equals the last change of that key at or before the time."""
    # commit times non-decreasing in commit (LSN) order, one row per join key
    events = []
    ts = T
    for lsn, (op, dt, key, val) in enumerate(changes):
        ts += dt % 3
        events.append((op, ts, lsn, key, val))
    t = AsOfTable(key_column="device_id")
    order = list(events)
    shuffle.shuffle(order)  # arrival order does not matter for joins by the join key itself
    for op, ts_, lsn, key, val in order:
        row = {"device_id": key, "v": val}
        t.apply(ev(op, ts_, lsn, before=row if op == "d" else None, after=None if op == "d" else row))
    for key, dt in probes:
        at = T + dt
        expect = None
        for op, ts_, _lsn, k, val in events:
            if k == key and ts_ <= at:
                expect = None if op == "d" else {"device_id": key, "v": val}
        assert t.lookup(key, at) == expect
