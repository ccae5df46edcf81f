"""Raw readings as segments (fieldmesh.store.segments): the ``readings`` view and the API's query give
back exactly what was appended, and a pre-segment table keeps being read."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.model import Reading
from fieldmesh.store import segments

_COLS = "device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms, enrichment"

reading_st = st.builds(
    Reading,
    device_id=st.sampled_from(["a", "b", "dev/é", "c"]),
    ts_ms=st.integers(946_684_800_000, 4_102_444_800_000),
    measurements=st.dictionaries(st.sampled_from(["t", "h", "on"]),
                                 st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False)),
                                 min_size=1),
    key=st.integers(0, 2**63 - 1),
    chk=st.integers(-(2**63), 2**63 - 1),
    seq=st.one_of(st.none(), st.integers(0, 2**40)),
    boot_id=st.one_of(st.none(), st.sampled_from(["b1", "b2"])),
    # the view's text columns end at a NUL (SQLite's ->>); raw_query keeps it (test below). No lone surrogates:
    # no decoder the gateway uses gives one (msgspec's JSON refuses them, Avro and Protobuf strings are UTF-8)
    event_id=st.one_of(st.none(), st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                                          max_size=5)),
    meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    received_ms=st.integers(946_684_800_000, 4_102_444_800_000),
    enrichment=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
)


def _db(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.executescript(segments.SCHEMA)
    segments.migrate_rows_table(con)
    return con


def _expected(rs: list[Reading]) -> list[tuple[object, ...]]:
    enc = msgspec.json.Encoder()

    def js(v: object) -> str | None:
        return None if v is None else enc.encode(v).decode()

    return [(r.device_id, r.ts_ms, r.seq, r.boot_id, r.event_id, js(r.measurements), js(r.meta), r.received_ms,
             js(r.enrichment)) for r in rs]


def _norm(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """JSON columns compared as values (SQLite's ->> re-serialises objects compactly)."""
    def v(x: object) -> object:
        return json.loads(x) if isinstance(x, str) and x[:1] in "{[" else x
    return [(d, t, s, b, e, v(m), v(me), rx, v(en)) for d, t, s, b, e, m, me, rx, en in rows]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(reading_st, max_size=30), max_size=4))
def test_view_gives_back_what_was_appended(tmp_path_factory: object, batches: list[list[Reading]]) -> None:
    path = tmp_path_factory.mktemp("seg") / "s.db"  # type: ignore[attr-defined]
    con = _db(path)
    sent: list[Reading] = []
    for i, rs in enumerate(batches):
        cols = ReadingColumns.from_readings(rs)
        key = np.arange(len(rs), dtype=np.int64) + 1000 * i
        con.execute("BEGIN")
        made = segments.append(con, cols, key, stored_ms=7)
        con.execute("COMMIT")
        assert made == len({r.device_id for r in rs})
        sent.extend(rs)
    got = con.execute(f"SELECT {_COLS} FROM readings").fetchall()
    assert sorted(_norm(got), key=repr) == sorted(_norm(_expected(sent)), key=repr)
    # arrival order within a device is rid order
    for dev in {r.device_id for r in sent}:
        rows = con.execute(f"SELECT {_COLS} FROM readings WHERE device_id = ? ORDER BY rid", (dev,)).fetchall()
        assert _norm(rows) == _norm(_expected([r for r in sent if r.device_id == dev]))
    assert con.execute("SELECT count(*), count(DISTINCT rid) FROM readings").fetchone() == (len(sent), len(sent))


def _r(dev: str, ts: int, **m: float) -> Reading:
    return Reading(dev, ts, m, key=ts, chk=0, received_ms=ts)


def test_raw_query_filters_and_orders(tmp_path: Path) -> None:
    con = _db(tmp_path / "s.db")
    batches = [[_r("a", 100, t=1.0), _r("b", 150, h=2.0), _r("a", 300, t=3.0, h=1.0)],
               [_r("a", 200, h=4.0), _r("a", 300, t=5.0), _r("b", 50, t=6.0)]]
    for i, rs in enumerate(batches):
        segments.append(con, ReadingColumns.from_readings(rs), np.arange(3, dtype=np.int64) + 10 * i, 1)

    def q(**kw: object) -> list[tuple[str, int, str]]:
        args: dict[str, object] = {"device_id": None, "metric": None, "start_ms": None, "end_ms": None, "limit": 100}
        args.update(kw)
        return [(d, t, m) for d, t, _, _, _, m, *_ in segments.raw_query(con, **args)]  # type: ignore[arg-type]

    # newest first; equal times in arrival order
    assert q(device_id="a") == [("a", 300, '{"t":3.0,"h":1.0}'), ("a", 300, '{"t":5.0}'), ("a", 200, '{"h":4.0}'),
                                ("a", 100, '{"t":1.0}')]
    assert [t for _, t, _ in q(start_ms=150, end_ms=300)] == [200, 150]
    assert [(d, t) for d, t, _ in q(metric="h")] == [("a", 300), ("a", 200), ("b", 150)]
    assert len(q(limit=2)) == 2
    assert q(device_id="zz") == []


def test_a_row_table_is_kept_behind_the_view(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(
        "CREATE TABLE readings (rid INTEGER PRIMARY KEY, id INTEGER NOT NULL, device_id TEXT NOT NULL,"
        " ts_ms INTEGER NOT NULL, seq INTEGER, boot_id TEXT, event_id TEXT, measurements TEXT NOT NULL, meta TEXT,"
        " received_ms INTEGER NOT NULL, stored_ms INTEGER NOT NULL, enrichment TEXT)"
    )
    con.execute("INSERT INTO readings VALUES (5, 1, 'a', 100, NULL, NULL, NULL, '{\"t\":1.0}', NULL, 100, 1, NULL)")
    con.executescript(segments.SCHEMA)
    assert segments.migrate_rows_table(con) is True
    segments.append(con, ReadingColumns.from_readings([_r("a", 100, t=2.0)]), np.array([2], dtype=np.int64), 1)
    rows = con.execute("SELECT id, ts_ms, measurements FROM readings ORDER BY rid").fetchall()
    assert rows == [(1, 100, '{"t":1.0}'), (2, 100, '{"t":2.0}')]  # the old row first: it arrived first
    got = segments.raw_query(con, device_id="a", metric="t", start_ms=0, end_ms=1000, limit=10)
    assert [m for *_, m, _, _, _ in got] == ['{"t":1.0}', '{"t":2.0}']
    assert segments.migrate_rows_table(con) is False  # the view is there: nothing to do


def test_raw_query_keeps_strings_whole(tmp_path: Path) -> None:
    con = _db(tmp_path / "s.db")
    r = Reading("a", 100, {"t": 1.0}, key=1, chk=0, boot_id="b\x00c", event_id="e\x00\u2028", received_ms=100)
    segments.append(con, ReadingColumns.from_readings([r]), np.array([1], dtype=np.int64), 1)
    ((_, _, _, boot, ev, *_),) = segments.raw_query(con, device_id="a", metric=None, start_ms=None, end_ms=None,
                                                    limit=5)
    assert (boot, ev) == ("b\x00c", "e\x00\u2028")
