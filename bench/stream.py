"""Stream core benchmark: ``decode`` and ``decide`` of the two engines, both in one run; readings per CPU-second.

The input is bench/processor.py's device stream (2,000 devices, 100 readings per message, 3 metrics,
5% duplicates, 3% an hour late, disorder) through the real gateway routing, in chunks of ``fetch_max``
records as the processor's fetch loop hands them over. Claims go to a dict (no store): its own time is
measured and reported apart, so ``decide`` is shown with and without it. Both engines must agree on
every batch (stored, duplicates, late, windows touched) and on the totals the oracle expects.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/stream.py [--quick] [--encoding 1|2] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/processor.py's stream generator

from processor import expected_late, make_records, make_stream

from fieldmesh.core.batch import CLAIMED, COLLISION, DUPLICATE, BatchResult
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.store.base import INTERVALS
from fieldmesh.stream import columnar, reference
from fieldmesh.stream.base import DecodedBatch, StreamState


class DictClaims:
    """Claims over a dict (key -> (chk, origin)); ``cpu_s`` is the CPU time spent in it."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[int, int]] = {}
        self.cpu_s = 0.0

    def __call__(
        self, keys: NDArray[np.int64], chks: NDArray[np.int64], origins: NDArray[np.int64]
    ) -> NDArray[np.int8]:
        c0 = time.process_time()
        ks, cs, os_ = keys.tolist(), chks.tolist(), origins.tolist()
        found = list(map(self.held.get, ks))
        out = np.full(len(ks), CLAIMED, dtype=np.int8)
        if found.count(None) == len(found):
            self.held.update(zip(ks, zip(cs, os_, strict=True), strict=True))
        else:
            for i, (h, k, c, o) in enumerate(zip(found, ks, cs, os_, strict=True)):
                if h is None:
                    self.held[k] = (c, o)
                elif h[0] != c:
                    out[i] = COLLISION
                elif h[1] != o or o == -1:
                    out[i] = DUPLICATE
        self.cpu_s += time.process_time() - c0
        return out


def run(engine: Any, chunks: list[list[Any]]) -> tuple[dict[str, float], list[BatchResult]]:
    """Decode then decide every chunk, the state carried as the processor does; CPU seconds of each."""
    claims = DictClaims()
    state = StreamState({}, {}, {})
    grace = ProcessorSettings().grace_ms
    dec = dcd = 0.0
    results = []
    for recs in chunks:
        c0 = time.process_time()
        batch: DecodedBatch = engine.decode(recs, state)
        c1 = time.process_time()
        res = engine.decide(batch, state, claims, grace_ms=grace, intervals=INTERVALS)
        c2 = time.process_time()
        dec += c1 - c0
        dcd += c2 - c1
        results.append(res)
        state = StreamState({**state.positions, **res.positions}, {**state.watermarks, **res.watermarks},
                            {**state.device_watermarks, **res.device_watermarks})
    return {"decode": dec, "decide": dcd, "claim": claims.cpu_s}, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 devices instead of 2,000")
    ap.add_argument("--per-device", type=int, default=500)
    ap.add_argument("--encoding", type=int, choices=(1, 2), default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per engine (alternating); the best is reported")
    args = ap.parse_args()
    devices = 200 if args.quick else 2000
    msgs, sent, now = make_stream(devices=devices, per_device=args.per_device)
    records = make_records(msgs, now, args.encoding)
    fetch = ProcessorSettings().fetch_max
    chunks = [records[i : i + fetch] for i in range(0, len(records), fetch)]
    n = len(sent)
    print(f"input: {devices:,} devices, {n:,} readings in {len(records):,} records (v{args.encoding}),"
          f" {len(chunks)} batches of {fetch} records")
    best: dict[str, dict[str, float]] = {}
    outcome: dict[str, list[BatchResult]] = {}
    for _ in range(args.repeat):
        for name, engine in (("reference", reference), ("columnar", columnar)):
            t, outcome[name] = run(engine, chunks)
            if name not in best or t["decide"] < best[name]["decide"]:
                best[name] = t
    for a, b in zip(outcome["reference"], outcome["columnar"], strict=True):
        assert dict(a.counts) == dict(b.counts), (a.counts, b.counts)
        assert all(len(a.windows[i]) == len(b.windows[i]) for i in INTERVALS)
    stored = sum(r.counts["stored"] for r in outcome["columnar"])
    late = sum(r.counts["late"] for r in outcome["columnar"])
    assert (stored, late) == (len({(d, r["seq"]) for d, r in sent}), expected_late(sent, ProcessorSettings().grace_ms))
    for name, t in best.items():
        own = t["decide"] - t["claim"]
        print(f"{name:9s} decode {n / t['decode']:>12,.0f}/CPU-s ({1e9 * t['decode'] / n:6.0f} ns/reading)"
              f"  decide {n / t['decide']:>12,.0f}/CPU-s ({1e9 * t['decide'] / n:6.0f} ns/reading;"
              f" without the dict claim {1e9 * own / n:6.0f} ns, {n / own:,.0f}/CPU-s)")
    r, c = best["reference"], best["columnar"]
    print(f"columnar/reference: decode {r['decode'] / c['decode']:.1f}x, decide {r['decide'] / c['decide']:.1f}x,"
          f" decide without claims {(r['decide'] - r['claim']) / (c['decide'] - c['claim']):.1f}x")


if __name__ == "__main__":
    main()
