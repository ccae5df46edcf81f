"""Device twins in the hot store (store/twins.py), SQLite and PostgreSQL: versions, optimistic
concurrency under concurrent writers (no lost update, stale versions refused), limits, the change
sequence the twin service follows, the audit log."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from fieldmesh.core.errors import ConfigError, ConflictError
from fieldmesh.core.twins import TwinInvalid, TwinTooLarge
from fieldmesh.store.access import AccessStore
from fieldmesh.store.twins import TwinStore


@pytest.fixture
def twins(store_url: str) -> Iterator[TwinStore]:
    s = TwinStore(store_url)
    yield s
    s.close()


def test_desired_reported_delta_and_versions(twins: TwinStore, store_url: str) -> None:
    empty = twins.get("pump-1")
    assert (empty.version, empty.desired, empty.reported, empty.delta) == (0, {}, {}, {})
    t = twins.update_desired("pump-1", {"mode": "window", "window_ms": 10_000, "metrics": {"t": {"min": 0}}},
                             actor="test", ts_ms=1000)
    assert t.version == 1 and t.delta == t.desired
    assert t.desired_meta == {"/mode": 1000, "/window_ms": 1000, "/metrics/t/min": 1000}
    t = twins.update_reported("pump-1", {"mode": "window", "window_ms": 5000}, ts_ms=2000)
    assert t.version == 2
    assert t.delta == {"window_ms": 10_000, "metrics": {"t": {"min": 0}}}
    assert twins.get("pump-1") == t
    # null removes a member; nested objects merge
    t = twins.update_desired("pump-1", {"window_ms": None, "metrics": {"t": {"max": 9}}}, actor="test", ts_ms=3000)
    assert t.desired == {"mode": "window", "metrics": {"t": {"min": 0, "max": 9}}}
    assert t.desired_meta == {"/mode": 1000, "/metrics/t/min": 1000, "/metrics/t/max": 3000}
    assert t.version == 3
    # a change that changes nothing writes nothing
    seq = twins.seq()
    assert twins.update_reported("pump-1", {"mode": "window"}).version == 3
    assert twins.seq() == seq
    audit = AccessStore(store_url)
    try:
        acts = [(e.action, e.target) for e in audit.audit_log()]
    finally:
        audit.close()
    assert acts.count(("twin.desired", "pump-1")) == 2  # reported changes (from devices) are not audited


def test_stale_versions_are_refused(twins: TwinStore) -> None:
    twins.update_desired("d-1", {"a": 1}, actor="t")
    assert twins.update_desired("d-1", {"a": 2}, actor="t", expect_version=1).version == 2
    with pytest.raises(ConflictError) as exc:
        twins.update_desired("d-1", {"a": 3}, actor="t", expect_version=1)
    assert exc.value.kind == "twin_version"
    with pytest.raises(ConflictError):
        twins.update_reported("d-1", {"a": 3}, expect_version=0)
    assert twins.get("d-1").desired == {"a": 2}
    with pytest.raises(ConflictError):  # a twin that does not exist is at version 0
        twins.update_desired("d-2", {"a": 1}, actor="t", expect_version=5)


def test_limits_and_bad_ids(store_url: str) -> None:
    s = TwinStore(store_url, max_doc_bytes=100)
    try:
        s.update_desired("d-1", {"a": "x" * 40}, actor="t")
        with pytest.raises(TwinTooLarge):  # each patch is small; their sum is not
            s.update_desired("d-1", {"b": "y" * 60}, actor="t")
        with pytest.raises(TwinInvalid):
            s.update_reported("d-1", {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}})
        assert s.get("d-1").version == 1
        with pytest.raises(ConfigError):
            s.get("../x")
    finally:
        s.close()


def test_desired_changes_follow_the_sequence(twins: TwinStore) -> None:
    start = twins.seq()
    twins.update_desired("a-1", {"x": 1}, actor="t")
    twins.update_reported("a-2", {"y": 1})  # not a desired change
    twins.update_desired("a-3", {"x": 1}, actor="t")
    twins.update_desired("a-1", {"x": 2}, actor="t")
    changes = twins.desired_changes(start)
    assert [t.device_id for _, t in changes] == ["a-3", "a-1"]  # a-1 once, at its last change
    assert changes[-1][1].desired == {"x": 2}
    assert twins.desired_changes(changes[-1][0]) == []
    assert [t.device_id for t in twins.list()] == ["a-1", "a-2", "a-3"]


def test_concurrent_writers_lose_no_update(store_url: str) -> None:
    """Writers each on their own connection do read-modify-write with the version they read: every
    increment lands exactly once, and the stale ones are refused (then retried)."""
    writers, per_writer = 4, 25
    stores = [TwinStore(store_url) for _ in range(writers)]
    conflicts = [0] * writers
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def write(i: int) -> None:
        s = stores[i]
        try:
            barrier.wait()
            for n in range(per_writer):
                while True:
                    t = s.get("shared-1")
                    count = int(t.desired.get("count", 0))
                    try:
                        s.update_desired("shared-1", {"count": count + 1, f"w{i}": n + 1}, actor=f"w{i}",
                                         expect_version=t.version)
                        break
                    except ConflictError:
                        conflicts[i] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert not errors, errors
        final = stores[0].get("shared-1")
        assert final.desired["count"] == writers * per_writer  # 0 lost updates
        assert final.version == writers * per_writer
        assert all(final.desired[f"w{i}"] == per_writer for i in range(writers))
        assert sum(conflicts) > 0  # they did collide, and the stale ones were refused
    finally:
        for s in stores:
            s.close()


def test_blind_concurrent_merges_keep_every_member(store_url: str) -> None:
    """Without a version, concurrent merges of different members all land (the merge is in the transaction)."""
    writers, per_writer = 4, 20
    stores = [TwinStore(store_url) for _ in range(writers)]

    def write(i: int) -> None:
        for n in range(per_writer):
            stores[i].update_reported("blind-1", {f"k{i}_{n}": n})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        t = stores[0].get("blind-1")
        assert len(t.reported) == writers * per_writer
        assert t.version == writers * per_writer
    finally:
        for s in stores:
            s.close()


def test_reports_applied_together_refuse_each_on_its_own(store_url: str) -> None:
    s = TwinStore(store_url, max_doc_bytes=200)
    try:
        s.update_reported("m-1", {"a": 1})
        seq = s.seq()
        out = s.update_reported_many([
            ("m-1", {"b": 2}, None),
            ("m-2", {"a": 1}, None),
            ("m-1", {"c": 3}, 1),              # stale: m-1 is at 2 now
            ("m-1", {"big": "x" * 300}, None),  # past the limit
            ("m-1", {"a": 1}, 2),              # nothing changes
            ("bad.id", {"a": 1}, None),
            ("m-1", {"c": 3}, 2),
        ])
        assert [type(r).__name__ for r in out] == ["Twin", "Twin", "ConflictError", "TwinTooLarge", "Twin",
                                                   "ConfigError", "Twin"]
        t = s.get("m-1")
        assert t.reported == {"a": 1, "b": 2, "c": 3} and t.version == 3
        assert s.get("m-2").version == 1
        assert s.seq() == seq + 3  # one per change written
    finally:
        s.close()
