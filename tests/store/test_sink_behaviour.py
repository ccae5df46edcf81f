"""The hot store as a Sink, one suite over SQLite and PostgreSQL (docs/design/processing-core.md §2, package B).

Bus records go through the reference engine (``stream.reference.decode`` / ``decide``) into
``HotStore.commit``, the processor's path. What is stored must equal :mod:`fmtest.oracle` whatever
the batching, duplication, disorder and (forced) key collisions; nothing of a failed transaction may
remain, claims included; a process killed in the middle resumes from ``applied()``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import CLAIMED, COLLISION, DUPLICATE, BatchResult, ReadingColumns
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.errors import ConfigError, StoreSchemaError
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store import HotStore, load_store
from fieldmesh.store.base import INTERVALS, DeviceSummary, HotTxn
from fieldmesh.store.batchrows import StaleResult
from fieldmesh.stream import reference
from fieldmesh.stream.base import StreamState
from fmtest import oracle
from fmtest.claims import ClaimStore
from fmtest.drive import commit_readings, commit_records, state_of
from fmtest.sqlitekeys import fold_recent_by_hand

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NOW = 1_763_812_345_123
BASE = NOW - 3 * 3_600_000
TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"


# ---- input -------------------------------------------------------------------------------------


def make_items(seed: int, n: int = 120) -> list[tuple[str, dict[str, Any]]]:
    """Distinct readings (one per identity) of three devices, some with event_id or boot_id."""
    rnd = random.Random(seed)
    items: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        r: dict[str, Any] = {
            "ts": BASE + rnd.randrange(0, 3 * 3_600_000),
            "measurements": {m: rnd.choice([rnd.uniform(-1e6, 1e6), rnd.randint(-5, 5), rnd.random() < 0.5])
                             for m in rnd.sample(["t", "h", "v"], rnd.randint(1, 3))},
        }
        if rnd.random() < 0.8:
            r["seq"] = i
            if rnd.random() < 0.3:
                r["boot_id"] = rnd.choice(["b1", "b2"])
        if rnd.random() < 0.15:
            r["event_id"] = f"e{i}"
        items.append((rnd.choice(["d1", "d2", "d-3"]), r))
    return list(oracle.unique_readings(items).values())


def readings_of(items: list[tuple[str, dict[str, Any]]]) -> list[Reading]:
    out: list[Reading] = []
    for dev, r in items:
        extra = {k: r[k] for k in ("event_id", "boot_id") if k in r}
        p = encode_reading_json(dev, r["ts"], r["measurements"], r.get("seq"), **extra)
        res = decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=NOW)
        assert not res.rejects, res.rejects
        out.extend(res.readings)
    return out


def collide(readings: list[Reading], rnd: random.Random, pairs: int = 6) -> list[Reading]:
    """Give some readings the 63-bit key of another (a forced collision: same key, other check value)."""
    out = list(readings)
    for _ in range(pairs):
        a, b = rnd.sample(range(len(out)), 2)
        out[b] = msgspec.structs.replace(out[b], key=out[a].key)
    return out


def sent(seed: int, n: int = 120) -> tuple[list[tuple[str, dict[str, Any]]], list[Reading]]:
    """The distinct items, and what was sent: collided, duplicated and shuffled."""
    rnd = random.Random(seed)
    items = make_items(seed, n)
    rs = collide(readings_of(items), rnd)
    rs = rs + [rnd.choice(rs) for _ in range(len(rs) // 3)]
    rnd.shuffle(rs)
    return items, rs


def records(rs: list[Reading], sizes: list[int], start: int = 1) -> list[BusRecord]:
    out: list[BusRecord] = []
    i, off, k = 0, start, 0
    while i < len(rs):
        n = sizes[k % len(sizes)]
        out.append(BusRecord(topic=READINGS_TOPIC, partition=off % 3, offset=off,
                             value=encode_bus_batch(BusBatch(rs[i : i + n]))))
        i, off, k = i + n, off + 1, k + 1
    return out


def commit_in_chunks(store: HotStore, recs: list[BusRecord], chunk: int) -> None:
    for s in range(0, len(recs), chunk):
        commit_records(store, recs[s : s + chunk])


# ---- what a store holds ------------------------------------------------------------------------


def snapshot(store: HotStore) -> dict[str, Any]:
    raw = store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**6)
    st = store.stats()
    return {
        "raw": sorted(map(repr, raw)),
        **{i: store.rollups(interval=i, device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**6)
           for i in INTERVALS},
        "stats": (st.stored, st.duplicates, st.late, st.gaps, dict(st.dead_lettered)),
        "devices": store.devices(),
        "positions": store.applied(),
        "watermarks": store.watermarks(),
    }  # fmt: skip


def assert_oracle(store: HotStore, items: list[tuple[str, dict[str, Any]]]) -> None:
    assert store.stats().stored == len(oracle.unique_readings(items))
    for interval in INTERVALS:
        expected = oracle.rollups(items, interval)
        got = {(r["device_id"], r["metric"], r["window_start_ms"]): r
               for r in store.rollups(interval=interval, device_id=None, metric=None, start_ms=None, end_ms=None,
                                      limit=10**6)}  # fmt: skip
        assert set(got) == set(expected)
        for k, e in expected.items():
            g = got[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k


def fresh(store_url: str, tmp_path: Path, name: str) -> str:
    """Another store of the same kind as ``store_url``."""
    if store_url.startswith("sqlite:///"):
        return f"sqlite:///{tmp_path / name}.db"
    return f"{store_url}_{name}"


# ---- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_batching_equals_the_oracle(store: HotStore, store_url: str, tmp_path: Path, seed: int) -> None:
    items, rs = sent(seed)
    rnd = random.Random(seed)
    recs = records(rs, [rnd.randint(1, 9) for _ in range(4)])
    commit_in_chunks(store, recs, rnd.randint(1, 6))
    assert_oracle(store, items)
    st = store.stats()
    assert st.stored + st.duplicates == len(rs)
    # the same readings in one batch, in other records: the same store
    other = load_store(fresh(store_url, tmp_path, "one"))
    try:
        commit_in_chunks(other, records(rs, [len(rs)]), 1)
        a, b = snapshot(store), snapshot(other)
        for k in ("raw", "1m", "1h", "stats", "devices"):
            assert a[k] == b[k], k
    finally:
        other.close()


def test_claim_answers(store: HotStore) -> None:
    keys = np.array([11, 12, 13], dtype=np.int64)
    chks = np.array([1, 2, 3], dtype=np.int64)
    got: list[list[int]] = []

    def build(txn: HotTxn) -> BatchResult:
        got.append(txn.claim_keys(keys, chks, np.array([7, -1, 9], dtype=np.int64)).tolist())
        got.append(txn.claim_keys(keys[:1], chks[:1], np.array([7], dtype=np.int64)).tolist())  # same txn
        return _empty()

    store.commit(build)

    def again(txn: HotTxn) -> BatchResult:
        got.append(txn.claim_keys(keys, np.array([1, 2, 4], dtype=np.int64), np.array([7, -1, 9], dtype=np.int64))
                   .tolist())
        got.append(txn.claim_keys(np.array([11, 14], dtype=np.int64), np.array([1, 5], dtype=np.int64),
                                  np.array([8, -1], dtype=np.int64)).tolist())
        return _empty()

    store.commit(again)
    assert got == [
        [CLAIMED] * 3,
        [CLAIMED],  # the same origin claims again
        [CLAIMED, DUPLICATE, COLLISION],  # origin -1 never matches; another check value collides
        [DUPLICATE, CLAIMED],  # another origin is a duplicate; a new key is claimed
    ]


def _empty() -> BatchResult:
    """A batch with nothing in it (the claims above are the test)."""
    return reference.settle(
        ReadingColumns.from_readings([]), np.zeros(0, np.bool_), np.zeros(0, np.int64),
        lambda k, c, o: np.zeros(0, np.int8), intervals=INTERVALS,
    )


def test_an_exception_inside_build_or_later_leaves_nothing(store: HotStore) -> None:
    items, rs = sent(7)
    recs = records(rs, [5])
    before = snapshot(store)
    state = state_of(store)
    batch = reference.decode(recs, state)

    def failing(txn: HotTxn) -> BatchResult:
        reference.decide(batch, state, txn.claim_keys, grace_ms=0, intervals=INTERVALS)  # claims every key
        raise RuntimeError("the engine failed after claiming")

    with pytest.raises(RuntimeError):
        store.commit(failing, ts_ms=batch.cols.ts_ms)
    assert snapshot(store) == before

    def bad_interval(txn: HotTxn) -> BatchResult:  # fails in the store's own writing
        return reference.decide(batch, state, txn.claim_keys, grace_ms=0, intervals={**INTERVALS, "5m": 300_000})

    with pytest.raises(ConfigError, match="5m"):
        store.commit(bad_interval, ts_ms=batch.cols.ts_ms)
    assert snapshot(store) == before
    # no claim survived: every reading is stored, none counted a duplicate of a rolled-back claim
    commit_in_chunks(store, recs, len(recs))
    assert_oracle(store, items)
    assert store.stats().stored + store.stats().duplicates == len(rs)


def test_write_skips_applied_results_and_refuses_stale_ones(store: HotStore, store_url: str, tmp_path: Path) -> None:
    items, rs = sent(11)
    recs = records(rs, [4])
    # decided elsewhere (an in-memory claim store standing for another sink's state): written whole
    empty = StreamState({}, {}, {})
    claims = ClaimStore()
    first = reference.decide(reference.decode(recs[:10], empty), empty, claims, grace_ms=0, intervals=INTERVALS)
    assert store.write(first) is True
    after = snapshot(store)
    assert store.write(first) is False  # every position applied: skipped
    assert snapshot(store) == after
    # a result with new positions whose keys are held here already: refused, nothing written
    stale = reference.decide(reference.decode(recs[:10], empty), empty, ClaimStore(), grace_ms=0, intervals=INTERVALS)
    stale = dataclasses.replace(stale, positions={(READINGS_TOPIC, 0): 10**6})
    with pytest.raises(StaleResult):
        store.write(stale)
    assert snapshot(store) == after
    # the rest through the processor's path: the oracle
    commit_in_chunks(store, recs, 3)
    assert_oracle(store, items)


def test_redeciding_committed_records_with_their_origins_is_identical(store: HotStore) -> None:
    _, rs = sent(5)
    recs = records(rs, [6])
    commit_in_chunks(store, recs[:3], 3)
    state = state_of(store)
    batch = reference.decode(recs[3:9], state)
    done = store.commit(
        lambda txn: reference.decide(batch, state, txn.claim_keys, grace_ms=0, intervals=INTERVALS),
        ts_ms=batch.cols.ts_ms,
    )
    again: list[BatchResult] = []

    class Rollback(Exception):
        pass

    def redecide(txn: HotTxn) -> BatchResult:
        again.append(reference.decide(batch, state, txn.claim_keys, grace_ms=0, intervals=INTERVALS))
        raise Rollback

    with pytest.raises(Rollback):
        store.commit(redecide)
    assert same_result(done, again[0])
    assert len(done.new) > 0 and done.counts["duplicates"] > 0


def same_result(a: BatchResult, b: BatchResult) -> bool:
    def cols(r: BatchResult) -> Any:
        n = r.new
        return (n.key.tolist(), n.chk.tolist(), n.ts_ms.tolist(), n.measurements_json.tolist(),
                r.store_key.tolist(), r.late.tolist())

    def windows(r: BatchResult) -> Any:
        return {i: (w.device.tolist(), w.metric.tolist(), w.window_start_ms.tolist(), w.count.tolist(),
                    w.sum_m.tolist(), w.sum_e.tolist(), w.min.tolist(), w.max.tolist()) for i, w in r.windows.items()}

    return (dict(a.counts), dict(a.positions), dict(a.watermarks), cols(a), windows(a)) == (
        dict(b.counts), dict(b.positions), dict(b.watermarks), cols(b), windows(b))


def test_device_watermarks_and_summary(store: HotStore) -> None:
    assert store.device_summary() == DeviceSummary(devices=0, last_seen_ms=None)
    assert store.last_seen() == {}
    assert store.device_watermarks() == {}
    rs = [
        msgspec.structs.replace(r, received_ms=NOW + i)
        for i, r in enumerate(readings_of([("a", {"ts": BASE + 5, "seq": 1, "measurements": {"t": 1}}),
                                           ("a", {"ts": BASE + 9, "seq": 2, "measurements": {"t": 2}}),
                                           ("b", {"ts": BASE + 1, "seq": 1, "measurements": {"t": 3}})]))
    ]  # fmt: skip
    commit_readings(store, rs)
    assert store.device_watermarks() == {"a": BASE + 9, "b": BASE + 1}
    assert store.device_summary() == DeviceSummary(devices=2, last_seen_ms=NOW + 2)
    # per device, when its last reading was received: what the freshness metrics and SLOs read
    assert store.last_seen() == {"a": NOW + 1, "b": NOW + 2}


def test_a_version_2_store_migrates_to_version_3(store_url: str) -> None:
    _, rs = sent(13)
    recs = records(rs, [5])
    s = load_store(store_url)
    commit_in_chunks(s, recs[:4], 2)
    before = snapshot(s)
    s.close()
    keys = "idents" if store_url.startswith("sqlite:///") else "reading_keys"
    if store_url.startswith("sqlite:///"):  # one identity table (SQLite keys land in idents_recent since 4)
        con = sqlite3.connect(store_url[len("sqlite:///") :])
        fold_recent_by_hand(con)
        con.commit()
        con.close()
    # what version 2 was: no origins
    _sql(store_url, [f"ALTER TABLE {keys} DROP COLUMN origin",
                     "UPDATE meta SET value = '2' WHERE key = 'schema_version'"])
    with pytest.raises(StoreSchemaError, match="migrates"):  # a reader cannot migrate: it says who can
        load_store(store_url, readonly=True)
    s = load_store(store_url)  # the writer migrates (a nullable column: no rewrite)
    try:
        assert snapshot(s) == before
        r = load_store(store_url, readonly=True)
        assert r.stats() == s.stats()
        r.close()
        # keys of version 2 have no origin: re-deciding their records finds duplicates, as before
        state = StreamState({}, {}, {})
        again: list[BatchResult] = []

        class Rollback(Exception):
            pass

        def redecide(txn: HotTxn) -> BatchResult:
            again.append(reference.decide(reference.decode(recs[:4], state), state, txn.claim_keys, grace_ms=0,
                                          intervals=INTERVALS))
            raise Rollback

        with pytest.raises(Rollback):
            s.commit(redecide)
        assert again[0].counts["stored"] == 0
        commit_in_chunks(s, recs, 3)
        assert s.stats().stored + s.stats().duplicates == len(rs)
    finally:
        s.close()


def _sql(url: str, stmts: list[str]) -> None:
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :])
        for q in stmts:
            con.execute(q)
        con.commit()
        con.close()
        return
    import psycopg

    base, _, schema = url.partition("?schema=")
    with psycopg.connect(base, autocommit=True, options=f"-c search_path={schema}") as con:
        for q in stmts:
            con.execute(q)


_CHILD = """
import pickle, sys
from fieldmesh.store import load_store
from fmtest.drive import commit_records
recs = pickle.load(open(sys.argv[2], "rb"))
store = load_store(sys.argv[1])
print("ready", flush=True)
for s in range(0, len(recs), 2):
    commit_records(store, recs[s : s + 2])
print("done", flush=True)
"""


def test_kill_9_while_committing_then_resume_from_applied(store_url: str, tmp_path: Path) -> None:
    items, rs = sent(17, n=1500)
    recs = records(rs, [2])
    path = tmp_path / "recs.pickle"
    path.write_bytes(pickle.dumps(recs))
    load_store(store_url).close()  # the schema exists before the child races to it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    kills = 0
    for delay in (0.05, 0.3, 0.6):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, store_url, str(path)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait(30)
    assert kills, "the child finished before any kill: give it more records"
    store = load_store(store_url)
    try:
        applied = store.applied()
        assert applied, "nothing was committed before the kills"
        commit_in_chunks(store, recs, 5)  # resume: records at or below applied() are skipped by decode
        assert_oracle(store, items)
        st = store.stats()
        assert st.stored + st.duplicates == len(rs)  # each reading counted once, across the kills
    finally:
        store.close()


def test_a_result_needing_a_new_day_is_committed_without_ts_ms(store: HotStore, store_url: str) -> None:
    """Without ``ts_ms``, PostgreSQL learns the days from the result: it rolls back, makes the partition and
    runs ``build`` again (SQLite needs no partitions: one run)."""
    items = [("d1", {"ts": BASE - k * 86_400_000, "seq": k, "measurements": {"t": float(k)}}) for k in range(3)]
    rs = readings_of(items)
    runs = 0

    def build(txn: HotTxn) -> BatchResult:
        nonlocal runs
        runs += 1
        cols = ReadingColumns.from_readings(rs)
        return reference.settle(cols, np.zeros(len(rs), np.bool_), np.full(len(rs), -1, np.int64), txn.claim_keys,
                                intervals=INTERVALS)

    res = store.commit(build)
    assert res.counts["stored"] == 3 and store.stats().stored == 3
    assert runs == (1 if store_url.startswith("sqlite:///") else 2)
    assert_oracle(store, items)
