"""Point-in-time training sets: read from the lake's features table, checked against an oracle that
recomputes, from the raw arrivals alone, what was known at each ts (5% late and 5% duplicated readings)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import LakeSettings
from fieldmesh.store.lake import open_catalog
from fieldmesh.store.offline import (
    LabelSpec,
    build_training_set,
    feature_rows_arrow,
    feature_rows_from_arrow,
    read_entities,
    read_feature_rows,
    split_views,
)
from fieldmesh.stream.pointintime import AsOfIndex, FeatureRows, LabelEvents, label_join
from fmtest.featurerows import View, append_rows, features_table, make_stream, oracle_known, stream_rows

VIEW = View("pump_stats", ("temperature", "pressure"), (60_000, 300_000), 60_000,
            ("mean", "min", "max", "stddev", "count", "last"), ttl_ms=20 * 60_000, lateness_ms=30_000)


def _queries(arrivals: list, n: int, seed: int) -> tuple[list[str], list[int]]:
    rnd = random.Random(seed)
    lo, hi = arrivals[0].received_ms - 120_000, arrivals[-1].received_ms + 3_600_000
    ents = [f"dev-{rnd.randrange(6)}" for _ in range(n)]  # dev-5 has no rows at all
    ts = [rnd.randrange(lo, hi) for _ in range(n)]
    # times exactly at a row's known_at, and one ms before it: the edges of "known"
    picks = rnd.sample(arrivals, n // 5)
    ents += [r.device_id for r in picks] * 2
    ts += [r.received_ms for r in picks] + [r.received_ms - 1 for r in picks]
    return ents, ts


def test_training_set_matches_the_oracle_of_raw_arrivals(tmp_path: Path) -> None:
    arrivals = make_stream(7, devices=5, minutes=90)
    late = sum(1 for i, r in enumerate(arrivals) if r.received_ms - r.ts_ms > 60_000)
    dups = len(arrivals) - len({r.key for r in arrivals})
    assert late > 0.03 * len(arrivals) and dups > 0.03 * len(arrivals), (late, dups)
    rows = stream_rows(VIEW, arrivals)
    catalog = open_catalog(LakeSettings(), tmp_path)
    table = features_table(catalog, "fieldmesh")
    half = len(rows) // 2  # two commits, as a lake sink would make
    append_rows(table, rows.take(np.arange(half)), max(VIEW.sizes_ms))
    append_rows(table, rows.take(np.arange(half, len(rows))), max(VIEW.sizes_ms))

    ents, ts = _queries(arrivals, 400, 1)
    entities = pa.table({"entity": ents, "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))})
    by_view = read_feature_rows(catalog, "fieldmesh", [VIEW.name], names={VIEW.name: VIEW.names})
    # the direct Parquet read of local files gives what pyiceberg's reader (object stores, deletes) gives
    slow = split_views(table.scan().to_arrow(), [VIEW.name], names={VIEW.name: VIEW.names})[VIEW.name]
    fast = by_view[VIEW.name]
    order_f = np.lexsort((fast.version, fast.window_end_ms, fast.entity.astype(str)))
    order_s = np.lexsort((slow.version, slow.window_end_ms, slow.entity.astype(str)))
    assert len(fast) == len(slow) == len(rows)
    assert np.array_equal(fast.values[order_f], slow.values[order_s], equal_nan=True)
    assert np.array_equal(fast.known_at_ms[order_f], slow.known_at_ms[order_s])
    out, summary = build_training_set(entities, by_view, ttl_ms={VIEW.name: VIEW.ttl_ms})
    got = out.to_pylist()
    checked = {"found": 0, "expired": 0, "none": 0}
    for e, t, row in zip(ents, ts, got, strict=True):
        want = oracle_known(VIEW, arrivals, e, t)
        end = row[f"{VIEW.name}__window_end"]
        if want is None or want["expired"]:
            checked["expired" if want else "none"] += 1
            assert end is None, (e, t, want, row)
            assert all(row[f"{VIEW.name}__{n}"] is None for n in VIEW.names)
            continue
        checked["found"] += 1
        assert end is not None and int(end.timestamp() * 1000) == want["window_end"], (e, t, want, end)
        assert int(row[f"{VIEW.name}__known_at"].timestamp() * 1000) == want["known_at"] <= t
        for n in VIEW.names:
            v = row[f"{VIEW.name}__{n}"]
            if n not in want["values"]:
                assert v is None, (n, v)
            elif "__stddev__" in n:
                assert math.isclose(v, want["values"][n], rel_tol=1e-12, abs_tol=1e-12), (n, v, want["values"][n])
            else:
                assert v == want["values"][n], (e, t, n, v, want["values"][n])
    assert min(checked.values()) > 10, checked  # every case was exercised
    assert summary.views[VIEW.name]["found"] == checked["found"]
    assert summary.views[VIEW.name]["expired"] == checked["expired"]


def test_late_rows_never_leak_into_earlier_times() -> None:
    """A window re-emitted later (a higher version) or a row known late is invisible before its known_at."""
    rows = FeatureRows("v", np.array(["a", "a", "a"], dtype=object), np.array([60_000, 120_000, 120_000]),
                       np.array([61_000, 500_000, 125_000]), np.array([0, 1, 0]), ("x",),
                       np.array([[1.0], [3.0], [2.0]]), np.ones((3, 1), bool))
    idx = AsOfIndex(rows)
    got = idx.lookup(["a"] * 6, np.array([60_999, 61_000, 124_999, 125_000, 499_999, 500_000]))
    assert got.tolist() == [-1, 0, 0, 2, 2, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20), st.integers(0, 40), st.integers(0, 2)),
                min_size=0, max_size=60),
       st.lists(st.tuples(st.integers(0, 4), st.integers(-2, 45)), min_size=1, max_size=40))
def test_as_of_index_is_the_definition(rows: list[tuple[int, int, int, int]], queries: list[tuple[int, int]]) -> None:
    ent = np.array([f"e{r[0]}" for r in rows], dtype=object)
    fr = FeatureRows("v", ent, np.array([r[1] for r in rows], np.int64), np.array([r[2] for r in rows], np.int64),
                     np.array([r[3] for r in rows], np.int64), (), np.empty((len(rows), 0)),
                     np.empty((len(rows), 0), bool))
    got = AsOfIndex(fr).lookup([f"e{q[0]}" for q in queries], np.array([q[1] for q in queries], np.int64))
    for (e, t), g in zip(queries, got.tolist(), strict=True):
        cands = [(r[1], r[3]) for r in rows if r[0] == e and r[2] <= t]
        if not cands:
            assert g == -1
        else:
            assert g >= 0 and (rows[g][1], rows[g][3]) == max(cands) and rows[g][2] <= t and rows[g][0] == e


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), max_size=40),
       st.lists(st.tuples(st.integers(0, 4), st.integers(-5, 55)), min_size=1, max_size=30),
       st.integers(0, 20), st.sampled_from(["first", "last", "any", "count"]))
def test_label_join_is_the_definition(events: list[tuple[int, int]], queries: list[tuple[int, int]], horizon: int,
                                      agg: str) -> None:
    ev = LabelEvents(entity_column="device_id", label_column="failed")
    for i, (e, t) in enumerate(events):
        ev.add(f"e{e}", t, i)
    lj = label_join(ev, [f"e{q[0]}" for q in queries], np.array([q[1] for q in queries]), horizon_ms=horizon,
                    agg=agg)  # type: ignore[arg-type]
    for j, (e, t) in enumerate(queries):
        hits = sorted((ct, i) for i, (ee, ct) in enumerate(events) if ee == e and t < ct <= t + horizon)
        want = {"first": hits[0][1] if hits else None, "last": hits[-1][1] if hits else None,
                "any": bool(hits), "count": len(hits)}[agg]
        assert lj.value[j] == want
        assert lj.commit_ms[j] == (events[hits[-1 if agg == "last" else 0][1]][1] if hits else -1)


def test_arrow_round_trip_keeps_absent_and_nan_apart() -> None:
    rows = FeatureRows("v", np.array(["a", "b"], dtype=object), np.array([60_000, 60_000]), np.array([1, 2]),
                       np.array([0, 0]), ("x", "y"), np.array([[np.nan, 1.0], [2.0, 0.0]]),
                       np.array([[True, False], [True, True]]))
    back = feature_rows_from_arrow("v", feature_rows_arrow(rows), names=("x", "y"))
    assert back.present.tolist() == rows.present.tolist()
    assert np.isnan(back.values[0, 0]) and back.values[1].tolist() == [2.0, 0.0]
    # rows of 1 and 3 entries (4 = 2 x 2: must not be read as two rows of two), and rows all alike
    for present in ([[True, False, False], [True, True, True]], [[True, True, False], [True, True, False]]):
        r = FeatureRows("v", np.array(["a", "b"], dtype=object), np.array([1, 2]), np.array([1, 2]), np.array([0, 0]),
                        ("x", "y", "z"), np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), np.array(present))
        back = feature_rows_from_arrow("v", feature_rows_arrow(r), names=("z", "x", "y"))
        assert back.present.tolist() == np.array(present)[:, [2, 0, 1]].tolist()
        assert np.where(back.present, back.values, 0).tolist() == np.where(
            r.present, r.values, 0)[:, [2, 0, 1]].tolist()


def test_entities_files_and_their_errors(tmp_path: Path) -> None:
    csv = tmp_path / "e.csv"
    csv.write_text("entity,ts,label\n7,2026-01-01T00:00:00Z,1\n")
    t = read_entities(csv)
    assert t.column("entity").to_pylist() == ["7"]
    pq.write_table(pa.table({"entity": ["a"], "when": [1]}), tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match="lacks column"):
        read_entities(tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match="no entities file"):
        read_entities(tmp_path / "nope.csv")
    ev = LabelEvents(entity_column="device_id", label_column="failed")
    with pytest.raises(ConfigError, match="label"):
        build_training_set(t, {}, ttl_ms={}, label=LabelSpec(ev, 1000))


def test_rows_from_feature_rows_and_store_rows_agree() -> None:
    import json

    from fieldmesh.store.offline import feature_rows_from_rows, feature_rows_from_store
    from fieldmesh.stream.featureviews import FeatureRow

    rows = [FeatureRow("v", "a", 0, 60_000, 61_000, 0, {"x": 1.0, "y": math.nan}),
            FeatureRow("v", "b", 0, 60_000, 62_000, 1, {"y": 2.0}),
            FeatureRow("v", "a", 60_000, 120_000, 121_000, 0, {"x": 3.0, "y": 4.0, "z": 5.0})]
    stored = [(r.view, r.entity, r.window_start_ms, r.window_end_ms, r.known_at_ms, r.version,
               json.dumps({k: (None if math.isnan(v) else v) for k, v in r.values.items()})) for r in rows]
    for names in (None, ("y", "x")):
        a = feature_rows_from_rows("v", rows, names=names)
        b = feature_rows_from_store("v", stored, names=names)
        assert a.names == b.names == (("x", "y", "z") if names is None else names)
        assert a.present.tolist() == b.present.tolist()
        assert np.array_equal(a.values, b.values, equal_nan=True)
        assert a.entity.tolist() == b.entity.tolist() == ["a", "b", "a"]
        assert b.version.tolist() == [0, 1, 0] and b.known_at_ms.tolist() == [61_000, 62_000, 121_000]
    assert feature_rows_from_store("v", stored).present.tolist() == [[True, True, False], [False, True, False],
                                                                      [True, True, True]]
