"""One behaviour suite for every hot store (SQLite, PostgreSQL).

The expected rollups come from an oracle written here from first principles: ``math.fsum`` for
sums and ``fractions.Fraction`` for averages, sharing no arithmetic with the stores.
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import threading
import time
from collections import defaultdict
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.errors import ConfigError, StoreSchemaError
from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import DeadLetter, Reading
from fieldmesh.store import HotStore, load_store
from fmtest.drive import Committed, commit_readings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BASE_MS = 1_763_812_800_000  # 2025-11-22T12:00:00Z, a window and hour boundary
MIN = 60_000
HOUR = 3_600_000


# ---- fixtures --------------------------------------------------------------------------------




def reading(
    dev: str,
    ts_ms: int,
    seq: int | None,
    measurements: dict[str, float | bool],
    *,
    received_ms: int | None = None,
) -> Reading:
    key, chk = identity_digest(identity_string(dev, ts_ms, measurements, seq=seq))
    return Reading(dev, ts_ms, measurements, key, chk, seq=seq, received_ms=received_ms or ts_ms + 50)


def apply(store: HotStore, rs: list[Reading], *, late: bool = False, **kw: Any) -> Committed:
    return commit_readings(
        store,
        rs,
        late=[late] * len(rs),
        dead_letters=kw.get("dead_letters", []),
        positions=kw.get("positions", {}),
        watermarks=kw.get("watermarks", {}),
    )


# ---- the oracle --------------------------------------------------------------------------------


def oracle(rs: list[Reading], size_ms: int) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Rollups of the distinct readings (identity = device + seq here), from first principles."""
    seen: dict[tuple[str, int | None], Reading] = {}
    for r in rs:
        seen.setdefault((r.device_id, r.seq), r)
    vals: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in seen.values():
        for name, v in r.measurements.items():
            vals[(r.device_id, name, r.ts_ms // size_ms * size_ms)].append(float(v))
    return {
        k: {
            "count": len(vs),
            "sum": math.fsum(vs),
            "min": min(vs),
            "max": max(vs),
            "avg": float(sum((Fraction(v) for v in vs), Fraction(0)) / len(vs)),
        }
        for k, vs in vals.items()
    }


def stored_rollups(store: HotStore, interval: str, device_id: str | None = None) -> dict[Any, dict[str, Any]]:
    rows = store.rollups(
        interval=interval, device_id=device_id, metric=None, start_ms=None, end_ms=None, limit=10**6
    )
    return {
        (r["device_id"], r["metric"], r["window_start_ms"]): {
            k: r[k] for k in ("count", "sum", "min", "max", "avg")
        }
        for r in rows
    }


# ---- de-duplication ------------------------------------------------------------------------------


def test_dedupe_within_a_batch_and_across_batches(store: HotStore) -> None:
    rs = [reading("d1", BASE_MS + i * 1000, i, {"t": float(i)}) for i in range(20)]
    r1 = apply(store, rs[:12] + rs[:3])  # 3 duplicates inside the batch
    assert (r1.stored, r1.duplicates) == (12, 3)
    r2 = apply(store, rs[8:] + rs[8:10])  # 4 stored before + 2 repeated inside
    assert (r2.stored, r2.duplicates) == (8, 6)
    r3 = apply(store, rs)
    assert (r3.stored, r3.duplicates) == (0, 20)
    st_ = store.stats()
    assert (st_.stored, st_.duplicates) == (20, 29)
    assert len(store.raw(device_id="d1", metric=None, start_ms=None, end_ms=None, limit=100)) == 20
    assert stored_rollups(store, "1m") == oracle(rs, MIN)


def test_same_identity_is_one_reading_whatever_its_time(store: HotStore) -> None:
    """A re-sent reading (same device, boot, seq) is a duplicate even with another ts or day."""
    a = reading("d1", BASE_MS, 7, {"t": 1.0})
    b = reading("d1", BASE_MS + 3 * 86_400_000, 7, {"t": 2.0})
    assert (a.key, a.chk) == (b.key, b.chk)
    assert apply(store, [a]).stored == 1
    assert (apply(store, [b]).duplicates, store.stats().stored) == (1, 1)


def test_key_collision_with_another_identity_is_stored(store: HotStore, store_url: str) -> None:
    """Two identities with the same 63-bit key but different check values are both kept."""
    a = reading("d1", BASE_MS, 1, {"t": 1.0})
    b = Reading("d1", BASE_MS + 1000, {"t": 2.0}, a.key, a.chk ^ 1, seq=2, received_ms=BASE_MS)
    res = apply(store, [a, b, b])
    assert (res.stored, res.duplicates) == (2, 1)
    assert (apply(store, [b, a]).duplicates, store.stats().stored) == (2, 2)
    assert stored_rollups(store, "1m")[("d1", "t", BASE_MS)]["sum"] == 3.0


# ---- exact rollups -------------------------------------------------------------------------------

finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)
values = st.one_of(finite, st.floats(min_value=-10, max_value=10), st.integers(-1000, 1000).map(float))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    points=st.lists(
        st.tuples(st.integers(0, 2 * HOUR // 1000), values, st.booleans()), min_size=1, max_size=40
    ),
)
def test_rollups_are_exact_under_permutation_and_duplication(
    store: HotStore, data: st.DataObject, points: list[tuple[int, float, bool]]
) -> None:
    dev = f"dev-{secrets.token_hex(4)}"  # a device per example: the store is shared by the examples
    rs = [reading(dev, BASE_MS + s * 1000, i, {"v": v, "on": b}) for i, (s, v, b) in enumerate(points)]
    dups = data.draw(st.lists(st.sampled_from(rs), max_size=10))
    sent = data.draw(st.permutations(rs + dups))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(sent)), max_size=3)))
    total_dups = 0
    for a, b in zip([0, *cuts], [*cuts, len(sent)], strict=True):
        if a < b:
            total_dups += apply(store, sent[a:b]).duplicates
    assert total_dups == len(dups)
    for interval, size in (("1m", MIN), ("1h", HOUR)):
        got = stored_rollups(store, interval, device_id=dev)
        want = oracle(rs, size)
        assert got.keys() == want.keys()
        for k, w in want.items():
            g = got[k]
            assert g["count"] == w["count"]
            assert g["sum"] == w["sum"]  # bit for bit: the correctly rounded exact sum
            assert (g["min"], g["max"]) == (w["min"], w["max"])
            assert g["avg"] == w["avg"]


def test_late_readings_correct_the_rollups(store: HotStore) -> None:
    on_time = [reading("d1", BASE_MS + i * 10_000, i, {"t": 0.1 * i}) for i in range(30)]
    apply(store, on_time)
    before = stored_rollups(store, "1m")[("d1", "t", BASE_MS)]
    late = [reading("d1", BASE_MS + 5_000 + i, 100 + i, {"t": 0.7}) for i in range(3)]
    res = apply(store, late, late=True)
    assert (res.stored, res.late) == (3, 3)
    after = stored_rollups(store, "1m")
    assert after == oracle(on_time + late, MIN)
    assert after[("d1", "t", BASE_MS)]["count"] == before["count"] + 3
    assert stored_rollups(store, "1h") == oracle(on_time + late, HOUR)
    assert store.stats().late == 3
    assert apply(store, late, late=True).late == 0  # a replayed late reading is a duplicate


# ---- positions, watermarks, dead letters, counters -----------------------------------------------


def test_positions_and_watermarks_round_trip_and_never_go_back(store: HotStore) -> None:
    rs = [reading("d1", BASE_MS, 1, {"t": 1.0})]
    pos = {("fm.readings", 0): 41, ("fm.readings", 3): 7}
    wm = {("fm.readings", 0): BASE_MS, ("fm.readings", 3): BASE_MS + 5}
    apply(store, rs, positions=pos, watermarks=wm)
    assert store.positions() == pos
    assert store.watermarks() == wm
    apply(store, [], positions={("fm.readings", 0): 12, ("fm.dlq", 0): 2}, watermarks={("fm.readings", 0): 1})
    assert store.positions() == {**pos, ("fm.dlq", 0): 2}
    assert store.watermarks() == wm


def test_dead_letters_and_counters(store: HotStore) -> None:
    dls = [
        DeadLetter("malformed_json", "bad json", "devices/a/telemetry", BASE_MS, b"{nope"),
        DeadLetter("clock_skew", "ahead", "devices/b/telemetry", BASE_MS + 1, b'{"ts": 1}', device_id="b"),
        DeadLetter(
            "malformed_json", "binary", "devices/c/telemetry", BASE_MS + 2, b"\xff\x00", truncated=True
        ),
    ]
    res = apply(store, [reading("d1", BASE_MS, 1, {"t": 1.0})], dead_letters=dls)
    assert res.dead_lettered == 3
    s = store.stats()
    assert dict(s.dead_lettered) == {"malformed_json": 2, "clock_skew": 1}
    assert s.received == 1 + 3
    rows = store.dlq(reason=None, limit=10)
    assert [r["detail"] for r in rows] == ["binary", "ahead", "bad json"]  # newest first
    assert rows[0]["payload"] == "ff00" and rows[0]["payload_encoding"] == "hex" and rows[0]["truncated"]
    assert rows[1]["device_id"] == "b" and rows[1]["payload"] == '{"ts": 1}'
    assert [r["detail"] for r in store.dlq(reason="malformed_json", limit=1)] == ["binary"]
    assert store.dlq(reason="unauthorized", limit=10) == []


def test_devices(store: HotStore) -> None:
    apply(store, [reading("d2", BASE_MS + 5000, 1, {"t": 1.0}, received_ms=BASE_MS + 9000)])
    apply(store, [reading("d1", BASE_MS, 1, {"t": 1.0}), reading("d1", BASE_MS + 1000, 2, {"h": 3.0})])
    devs = store.devices()
    assert [d["device_id"] for d in devs] == ["d1", "d2"]
    d1 = store.devices("d1")[0]
    assert d1["readings"] == 2 and d1["metrics"] == ["h", "t"]
    assert d1["first_ts"] == "2025-11-22T12:00:00.000Z" and d1["last_ts"] == "2025-11-22T12:00:01.000Z"
    assert store.devices("d2")[0]["last_seen"] == "2025-11-22T12:00:09.000Z"
    assert store.devices("nope") == []


def test_raw_and_rollup_reads_with_filters(store: HotStore) -> None:
    rs = [reading(f"d{i % 2}", BASE_MS + i * 20_000, i, {"t": float(i), **({"h": 1.5} if i % 3 == 0 else {})})
          for i in range(12)]  # fmt: skip
    apply(store, rs)
    raw = store.raw(device_id="d0", metric=None, start_ms=None, end_ms=None, limit=100)
    assert [r["ts_ms"] for r in raw] == sorted((r.ts_ms for r in rs if r.device_id == "d0"), reverse=True)
    assert raw[0]["measurements"] == {"t": 10.0} and raw[0]["seq"] == 10
    only_h = store.raw(device_id=None, metric="h", start_ms=None, end_ms=None, limit=100)
    assert sorted(r["seq"] for r in only_h) == [0, 3, 6, 9] and all(
        r["measurements"] == {"h": 1.5} for r in only_h
    )
    window = store.raw(
        device_id=None, metric=None, start_ms=BASE_MS + 40_000, end_ms=BASE_MS + 100_000, limit=100
    )
    assert sorted(r["seq"] for r in window) == [2, 3, 4]
    assert len(store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=5)) == 5
    roll = store.rollups(
        interval="1m", device_id="d1", metric="t", start_ms=BASE_MS + MIN, end_ms=None, limit=100
    )
    want = oracle(rs, MIN)
    assert [(r["window_start_ms"], r["count"], r["sum"]) for r in roll] == [
        (k[2], v["count"], v["sum"])
        for k, v in sorted(want.items())
        if k[:2] == ("d1", "t") and k[2] >= BASE_MS + MIN
    ]
    assert roll[0]["window_start"] == "2025-11-22T12:01:00.000Z"
    with pytest.raises(ConfigError):
        store.rollups(interval="5m", device_id=None, metric=None, start_ms=None, end_ms=None, limit=1)


def test_query_is_read_only(store: HotStore) -> None:
    apply(store, [reading("d1", BASE_MS, 1, {"t": 1.0})])
    assert store.query("SELECT count(*) FROM readings").rows == [(1,)]
    with pytest.raises(ConfigError):
        store.query("DELETE FROM readings")
    assert store.query("SELECT count(*) FROM readings").rows == [(1,)]


# ---- concurrency and schema ------------------------------------------------------------------------


def test_readers_work_while_a_writer_writes(store: HotStore, store_url: str) -> None:
    reader = load_store(store_url, readonly=True)
    errors: list[BaseException] = []
    done = threading.Event()
    reads = [0]

    def read_loop() -> None:
        try:
            while not done.is_set():
                s = reader.stats()
                assert s.duplicates == 0
                reader.rollups(
                    interval="1m", device_id=None, metric=None, start_ms=None, end_ms=None, limit=50
                )
                reader.raw(device_id="w1", metric=None, start_ms=None, end_ms=None, limit=10)
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for b in range(20):
            apply(
                store,
                [reading("w1", BASE_MS + (b * 50 + i) * 100, b * 50 + i, {"t": 1.0}) for i in range(50)],
            )
            time.sleep(0.01)
    finally:
        done.set()
        for t in threads:
            t.join(30)
        reader.close()
    assert not errors, errors
    assert reads[0] > 0
    assert store.stats().stored == 1000


def _set_schema_version(url: str, version: str) -> None:
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :])
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        con.commit()
        con.close()
        return
    import psycopg

    base, _, schema = url.partition("?schema=")
    with psycopg.connect(base, autocommit=True) as con:
        con.execute(f"UPDATE {schema}.meta SET value = %s WHERE key = 'schema_version'", (version,))


@pytest.mark.parametrize("readonly", [False, True])
def test_schema_version_mismatch_is_a_clear_error(store: HotStore, store_url: str, readonly: bool) -> None:
    _set_schema_version(store_url, "999")
    with pytest.raises(StoreSchemaError, match="999"):
        load_store(store_url, readonly=readonly)


def test_unreachable_or_refused_postgres_is_a_clear_error(pg_url: str) -> None:
    import socket

    from fieldmesh.core.errors import BackendUnavailable
    from fieldmesh.store.postgres import PostgresStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
        PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x", connect_timeout_s=1.5)
    assert time.monotonic() - t0 < 8
    with pytest.raises(ConfigError, match="does not exist"):
        load_store(pg_url.rsplit("/", 1)[0] + "/fm_no_such_db")
    with pytest.raises(ConfigError, match="refused the login"):
        load_store(pg_url.replace("postgres@", "no_such_role@"))


def test_two_writers_on_the_same_windows_lose_no_update(store: HotStore, store_url: str) -> None:
    """Replicas handing a partition over may write the same windows at once: rollups stay exact."""
    rs = [
        reading(f"d{i % 3}", BASE_MS + (i % 40) * 1000, i, {"t": 0.1 * i, "u": 1.0 / (i + 1)})
        for i in range(600)
    ]
    other = load_store(store_url)
    errors: list[BaseException] = []

    def write(s: HotStore, part: list[Reading]) -> None:
        try:
            for k in range(0, len(part), 25):
                apply(s, part[k : k + 25])
        except BaseException as exc:
            errors.append(exc)

    # each writer gets half the readings plus a third of the other half (overlap = duplicates)
    a = rs[:300] + rs[300:400]
    b = rs[300:] + rs[:100]
    threads = [
        threading.Thread(target=write, args=(store, a)),
        threading.Thread(target=write, args=(other, b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    other.close()
    assert not errors, errors
    s = store.stats()
    assert (s.stored, s.duplicates) == (600, 200)
    assert stored_rollups(store, "1m") == oracle(rs, MIN)
    assert stored_rollups(store, "1h") == oracle(rs, HOUR)


def test_postgres_lost_connection_rolls_back_and_recovers(pg_url: str) -> None:
    """The server drops the writer mid-run: that batch is not applied, the next call works."""
    import psycopg

    from fieldmesh.core.errors import BackendUnavailable

    url = f"{pg_url}?schema=t_{secrets.token_hex(5)}"
    store = load_store(url)
    try:
        apply(store, [reading("d1", BASE_MS, 1, {"t": 1.0})], positions={("fm.readings", 0): 1})
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'fieldmesh-writer' AND datname = current_database()"
            )
        batch = [reading("d1", BASE_MS + 1000, 2, {"t": 2.0})]
        with pytest.raises(BackendUnavailable):
            apply(store, batch, positions={("fm.readings", 0): 2})
        assert store.stats().stored == 1 and store.positions() == {("fm.readings", 0): 1}
        res = apply(store, batch, positions={("fm.readings", 0): 2})  # the caller's retry
        assert res.stored == 1
        assert store.positions() == {("fm.readings", 0): 2}
        assert stored_rollups(store, "1m")[("d1", "t", BASE_MS)]["sum"] == 3.0
    finally:
        store.close()


def test_postgres_lost_connection_before_a_new_day_partition(pg_url: str) -> None:
    import psycopg

    from fieldmesh.core.errors import BackendUnavailable

    store = load_store(f"{pg_url}?schema=t_{secrets.token_hex(5)}")
    try:
        apply(store, [reading("d1", BASE_MS, 1, {"t": 1.0})])
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'fieldmesh-writer' AND datname = current_database()"
            )
        next_day = [reading("d1", BASE_MS + 86_400_000, 2, {"t": 2.0})]
        with pytest.raises(BackendUnavailable):
            apply(store, next_day)
        assert apply(store, next_day).stored == 1
        assert store.stats().stored == 2
    finally:
        store.close()
