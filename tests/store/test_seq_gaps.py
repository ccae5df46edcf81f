"""Sequence gaps in every hot store (SQLite, PostgreSQL), against an oracle.

The oracle counts from first principles: the set of seqs stored per (device, boot), and for each
boot ``max - min + 1 - len(set)``. It shares no code with :mod:`fieldmesh.store.seqgaps`.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.errors import StoreSchemaError
from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import Reading
from fieldmesh.store import HotStore, load_store
from fieldmesh.store.seqgaps import merge_ranges, seq_batch, seq_spans
from fmtest.drive import commit_readings
from fmtest.sqlitekeys import fold_recent_by_hand

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BASE_MS = 1_763_812_800_000  # 2025-11-22T12:00:00Z




def reading(dev: str, seq: int | None, boot: str | None = None, event_id: str | None = None, t: int = 0) -> Reading:
    ts = BASE_MS + (seq or 0) * 1000 + t
    m: dict[str, float | bool] = {"v": float(seq or 0)}
    key, chk = identity_digest(identity_string(dev, ts, m, seq, boot, event_id))
    return Reading(dev, ts, m, key, chk, seq=seq, boot_id=boot, event_id=event_id, received_ms=ts + 5)


def apply(store: HotStore, rs: list[Reading]) -> Any:
    return commit_readings(store, rs)


def oracle(stored: list[Reading]) -> int:
    """Missing seqs of one device: per boot, the span of the seqs stored minus how many there are."""
    by_boot: dict[str, set[int]] = defaultdict(set)
    for r in stored:
        if r.seq is not None:
            by_boot[r.boot_id or ""].add(r.seq)
    return sum(max(s) - min(s) + 1 - len(s) for s in by_boot.values())


def device_gaps(store: HotStore, dev: str) -> int:
    rows = store.devices(dev)
    assert len(rows) == 1
    gaps: int = rows[0]["gaps"]
    return gaps


# A device's stream: per boot, seqs 0..n-1 of which some are held back (the holes); each seq is
# carried by one plain reading (identity = boot + seq) and/or readings with their own event_id
# (identity = event_id): two identities, one seq.
boot_streams = st.dictionaries(
    st.sampled_from([None, "b1", "b2"]),
    st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.sets(st.integers(0, n - 1), max_size=n - 1),  # holes; at least one seq arrives
            st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=n, max_size=n),  # (plain?, n events)
        )
    ),
    min_size=1,
    max_size=3,
)


def carriers(dev: str, boot: str | None, seq: int, plain: bool, events: int) -> list[Reading]:
    rs = [reading(dev, seq, boot, f"ev-{boot}-{seq}-{j}", t=j + 1) for j in range(events)]
    return [*rs, reading(dev, seq, boot)] if plain or not rs else rs


def send(store: HotStore, data: st.DataObject, rs: list[Reading]) -> list[Reading]:
    """Send ``rs`` with re-sends mixed in, in any order and any batching; return what was sent."""
    if not rs:
        return []
    dups = data.draw(st.lists(st.sampled_from(rs), max_size=8))
    sent = data.draw(st.permutations(rs + dups))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(sent)), max_size=4)))
    for a, b in zip([0, *cuts], [*cuts, len(sent)], strict=True):
        if a < b:
            apply(store, sent[a:b])
    return sent


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), streams=boot_streams)
def test_gaps_match_the_oracle_and_fillers_uncount_them(
    store: HotStore, data: st.DataObject, streams: dict[str | None, tuple[int, set[int], list[tuple[bool, int]]]]
) -> None:
    dev = f"dev-{secrets.token_hex(4)}"  # a device per example: the store is shared by the examples
    before = store.stats().gaps
    first: list[Reading] = [reading(dev, None, t=7)]  # a reading without seq counts for nothing
    later: list[Reading] = []
    for boot, (n, holes, how) in streams.items():
        for seq, (plain, events) in enumerate(how[:n]):
            (later if seq in holes else first).extend(carriers(dev, boot, seq, plain, events))
    send(store, data, first)
    want = oracle(first)
    assert device_gaps(store, dev) == want
    assert store.stats().gaps - before == want
    # a redelivered batch (the processor restarting before it committed its position) changes nothing
    apply(store, first)
    assert device_gaps(store, dev) == want
    # the held-back readings arrive late, with re-sends of earlier ones: every hole is filled
    send(store, data, later + data.draw(st.lists(st.sampled_from(first), max_size=5)))
    assert oracle(first + later) == 0
    assert device_gaps(store, dev) == 0
    assert store.stats().gaps == before


def test_a_seq_carried_by_two_event_ids_counts_once(store: HotStore) -> None:
    apply(store, [reading("e", 0, event_id="a"), reading("e", 3, event_id="b")])
    assert (device_gaps(store, "e"), store.stats().gaps) == (2, 2)
    # seq 3 again under another identity, in the same batch and in later ones: still one seq
    res = apply(store, [reading("e", 3, event_id="c"), reading("e", 3, event_id="d"), reading("e", 3)])
    assert res.stored == 3  # three readings (identities) ...
    assert (device_gaps(store, "e"), store.stats().gaps) == (2, 2)  # ... but no new seq
    apply(store, [reading("e", 1, event_id="f"), reading("e", 2)])
    assert (device_gaps(store, "e"), store.stats().gaps) == (0, 0)
    apply(store, [reading("e", 2, event_id="g")])
    assert store.stats().gaps == 0  # never negative


def listed_seqs(store: HotStore, store_url: str, dev: str) -> int:
    ph = "?" if store_url.startswith("sqlite") else "%s"
    n: int = store.query(f"SELECT count(*) FROM seqs WHERE device_id = {ph}", [dev]).rows[0][0]
    return n


def test_a_plain_device_meeting_its_first_event_id_is_listed(store: HotStore, store_url: str) -> None:
    apply(store, [reading("t", 0), reading("t", 1), reading("t", 3)])
    apply(store, [reading("t", 7)])
    assert (device_gaps(store, "t"), listed_seqs(store, store_url, "t")) == (4, 0)  # plain: no seq set
    # the first event_id: its seq 3 is one the device has, seq 5 a new one, seq 6 plain in the same batch
    apply(store, [reading("t", 3, event_id="x"), reading("t", 5, event_id="y"), reading("t", 6)])
    assert (device_gaps(store, "t"), listed_seqs(store, store_url, "t")) == (2, 6)
    apply(store, [reading("t", 5), reading("t", 2, event_id="z")])  # a plain seq 5 too: no new seq
    assert device_gaps(store, "t") == 1
    apply(store, [reading("t", 4)])
    assert (device_gaps(store, "t"), store.stats().gaps) == (0, 0)


def test_gaps_are_per_boot_and_summed_per_device(store: HotStore) -> None:
    apply(store, [reading("p", 0, "b1"), reading("p", 4, "b1"), reading("p", 100, "b2"), reading("p", 102, "b2")])
    apply(store, [reading("q", 5), reading("q", 9)])
    assert device_gaps(store, "p") == 3 + 1  # a reboot restarting seq is no gap
    assert device_gaps(store, "q") == 3
    assert {d["device_id"]: d["gaps"] for d in store.devices()} == {"p": 4, "q": 3}
    assert store.stats().gaps == 7


def test_two_writers_taking_turns_count_each_seq_once(store_url: str) -> None:
    """Replicas handing a partition over write the same devices: no writer may trust stale ranges."""
    a, b = load_store(store_url), load_store(store_url)
    try:
        apply(a, [reading("w", 0), reading("w", 10)])  # a caches the range 0..10
        apply(b, [reading("w", 5), reading("w", 20), reading("w", 10, event_id="z")])
        apply(a, [reading("w", 6), reading("w", 30)])
        apply(b, [reading("w", 30, event_id="y"), reading("w", 1)])
        want = 31 - len({0, 10, 5, 20, 6, 30, 1})
        assert (device_gaps(a, "w"), a.stats().gaps, b.stats().gaps) == (want, want, want)
    finally:
        a.close()
        b.close()


def test_concurrent_writers_creating_the_same_ranges_count_exactly(store_url: str) -> None:
    """Two writers start the same (device, boot) at the same moment, round after round."""
    rounds = 25
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def writer(seqs: list[tuple[int, str | None]]) -> None:
        s = load_store(store_url)
        try:
            for i in range(rounds):
                barrier.wait()
                apply(s, [reading(f"c{i}", q, "b", ev) for q, ev in seqs])
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            s.close()

    threads = [
        threading.Thread(target=writer, args=([(0, None), (2, None), (4, None)],)),
        threading.Thread(target=writer, args=([(1, None), (4, "ev"), (8, None)],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    s = load_store(store_url, readonly=True)
    try:
        per_device = 8 + 1 - len({0, 1, 2, 4, 8})
        assert {d["device_id"]: d["gaps"] for d in s.devices()} == {f"c{i}": per_device for i in range(rounds)}
        assert s.stats().gaps == rounds * per_device
    finally:
        s.close()


def _downgrade_to_v1(url: str) -> None:
    """Make the store what schema version 1 was: no seq tables, no gaps counter, no key origins."""
    keys = "idents" if url.startswith("sqlite:///") else "reading_keys"
    stmts = [
        "DROP TABLE seqs", "DROP TABLE seq_ranges", "DELETE FROM counters WHERE name = 'gaps'",
        f"ALTER TABLE {keys} DROP COLUMN origin", "UPDATE meta SET value = '1' WHERE key = 'schema_version'",
    ]  # fmt: skip
    if url.startswith("sqlite:///"):
        con = sqlite3.connect(url[len("sqlite:///") :])
        fold_recent_by_hand(con)  # one identity table (keys land in idents_recent since version 4)
        for s in stmts:
            con.execute(s)
        con.commit()
        con.close()
        return
    import psycopg

    base, _, schema = url.partition("?schema=")
    with psycopg.connect(base, autocommit=True, options=f"-c search_path={schema}") as con:
        for s in stmts:
            con.execute(s)


def test_a_version_1_store_opens_and_counts_the_gaps_it_holds(store_url: str) -> None:
    s = load_store(store_url)
    apply(s, [reading("m", 0), reading("m", 3), reading("m", 5, "b"), reading("m", 3, event_id="x")])
    s.close()
    _downgrade_to_v1(store_url)
    with pytest.raises(StoreSchemaError, match="migrates"):  # a reader cannot migrate: it says who can
        load_store(store_url, readonly=True)
    s = load_store(store_url)  # the writer migrates
    try:
        assert (device_gaps(s, "m"), s.stats().gaps) == (2, 2)
        r = load_store(store_url, readonly=True)
        assert r.stats().gaps == 2
        r.close()
        apply(s, [reading("m", 1), reading("m", 2, event_id="y"), reading("m", 3, "b")])
        assert (device_gaps(s, "m"), s.stats().gaps) == (1, 1)  # boot "b": 3..5 lacks 4
    finally:
        s.close()


@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(["", "x"]), st.integers(0, 50)), unique=True))
def test_merge_ranges_in_any_split_matches_the_oracle(triples: list[tuple[str, str, int]]) -> None:
    ranges: dict[tuple[str, str], tuple[int, int, int]] = {}
    total = 0
    for i in range(0, len(triples), 3):
        chunk = triples[i : i + 3]
        spans = seq_spans(chunk)
        new, delta = merge_ranges(spans, {k: v[2] for k, v in spans.items()}, ranges)
        ranges.update(new)
        total += delta
    sets: dict[tuple[str, str], set[int]] = defaultdict(set)
    for d, b, s in triples:
        sets[(d, b)].add(s)
    assert total == sum(max(v) - min(v) + 1 - len(v) for v in sets.values())


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([None, "x", "y"]), st.integers(-1, 40)), max_size=40))
def test_seq_batch_spans_match_seq_spans(rows: list[tuple[str, str | None, int]]) -> None:
    # seq -1 stands for a reading without seq (skipped); the numpy reduction must give what seq_spans gives
    cols = ReadingColumns.from_readings([reading(d, None if s < 0 else s, b, t=i) for i, (d, b, s) in enumerate(rows)])
    got = seq_batch(cols)
    assert got.triples == [(d, b or "", s) for d, b, s in rows if s >= 0]
    assert got.spans == seq_spans(got.triples)
