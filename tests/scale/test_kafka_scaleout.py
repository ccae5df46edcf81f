"""Three ``fieldmesh process`` replicas in one Kafka consumer group, one killed with -9 mid-stream.

Gateway (Kafka ingress) -> Kafka bus (tansu) -> 3 processor replicas -> one PostgreSQL store. The
partitions spread over the replicas; after the kill the survivors take the dead one's partitions
and resume each from the position stored in PostgreSQL: the totals stay exact.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from fieldmesh.store import load_store
from fmtest.scale import Role, as_kafka, check_store_exact, expected_received, produce, wait_store

pytestmark = pytest.mark.integration

PARTS = 6
_ASSIGN = re.compile(r"kafka fm\.readings: (assigned|revoked) partitions \[([0-9, ]*)\]")


def current_assignment(log: str) -> set[int]:
    """The readings partitions a replica owns according to its log (eager rebalances: full sets)."""
    owned: set[int] = set()
    for kind, parts in _ASSIGN.findall(log):
        ps = {int(p) for p in parts.split(",") if p.strip()}
        owned = ps if kind == "assigned" else owned - ps
    return owned


def wait_spread(replicas: list[Role], timeout_s: float = 40) -> list[set[int]]:
    """Wait until the live replicas' assignments are disjoint, non-empty and cover every partition."""
    deadline = time.monotonic() + timeout_s
    got: list[set[int]] = []
    while time.monotonic() < deadline:
        got = [current_assignment(r.tail(10**7)) for r in replicas]
        union = set().union(*got)
        if all(got) and union == set(range(PARTS)) and sum(map(len, got)) == PARTS:
            return got
        time.sleep(0.2)
    raise TimeoutError(f"partitions not spread: {got}\n" + "\n".join(r.tail(1500) for r in replicas))


def test_three_replicas_one_group_kill9_moves_partitions_totals_exact(tmp_path: Path, tansu_factory, pg_url):
    bus, _ = tansu_factory()
    base, query = bus.split("?", 1)
    prefix = f"so{uuid.uuid4().hex[:6]}"
    store_url = f"{pg_url}?schema={prefix}"
    ingest = f"{base}/raw-{prefix}?group=gw-{prefix}&{query}"
    stream = make_stream(prefix, devices=40, per_device=80, seed=5)
    bad, good_in_bad = malformed(prefix)
    records = as_kafka(stream["messages"] + bad)
    first, rest = records[: len(records) // 3], records[len(records) // 3 :]
    produce(bus, f"raw-{prefix}", first)

    def role(name: str, *args: str) -> Role:
        return Role(tmp_path, name, *args)

    procs = [role(f"process-{i}", "process", "--bus-url", bus, "--store-url", store_url,
                  "--total-partitions", str(PARTS), "--group", f"fm-{prefix}") for i in range(3)]
    gw = role("gateway", "gateway", "--bus-url", bus, "--ingest-url", ingest, "--partitions", str(PARTS))
    store = None
    try:
        procs[0].start()
        procs[0].wait_log("processor running")  # creates the schema before the others check it
        for p in procs[1:]:
            p.start()
        gw.start()
        spread = wait_spread(procs)
        assert all(len(s) == 2 for s in spread), spread  # 6 partitions over 3 members: 2 each
        store = load_store(store_url, readonly=True)
        wait_store(store, 1, what=lambda: gw.tail())

        # the rest arrives while one replica dies
        def feed() -> None:
            step = len(rest) // 8 + 1
            for i in range(0, len(rest), step):
                produce(bus, f"raw-{prefix}", rest[i : i + step])
                time.sleep(0.25)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(0.6)
        before = store.stats().received
        procs[1].kill9()
        feeder.join()
        total = expected_received(stream["sent"] + good_in_bad, MALFORMED_REASONS)
        assert 0 < before < total, (before, total)
        survivors = [procs[0], procs[2]]
        after = wait_spread(survivors)
        assert spread[1] <= after[0] | after[1], (spread, after)  # the dead one's partitions moved
        wait_store(store, total, timeout_s=60, what=lambda: "\n".join(p.tail(2000) for p in procs))
        time.sleep(1.0)  # nothing more may arrive: no double counting after the moves
        check_store_exact(store, stream["sent"] + good_in_bad, MALFORMED_REASONS)
    finally:
        if store is not None:
            store.close()
        assert gw.stop() == 0, gw.tail()
        for p in (procs[0], procs[2]):
            assert p.stop() == 0, p.tail()
        procs[1].stop()
