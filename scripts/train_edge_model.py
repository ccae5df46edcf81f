"""Train the edge anomaly model on simulator data and export it to ONNX.

    .venv/bin/python scripts/train_edge_model.py [--out src/fieldmesh/edge/models/anomaly.onnx]

Features are exactly what the agent computes at run time (``fieldmesh.edge.infer.Features``:
per metric ``log1p(|z|)`` of an EWMA z-score and the run length of identical values). Labels are
the simulator's injected faults (spikes and stuck sensors). The model is a small gradient-boosted
tree ensemble (scikit-learn), exported with skl2onnx; precision/recall are measured on a held-out
run (another seed, other devices) through onnxruntime, i.e. the exported model itself, and written
beside the model as ``anomaly.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fieldmesh.edge.frame import DeviceIndex, Frame
from fieldmesh.edge.infer import (
    DEFAULT_MODEL,
    FEATURE_METRICS,
    EwmaScorer,
    Features,
    OnnxScorer,
    feature_matrix,
)
from fieldmesh.edge.simulator import FleetSimulator


def simulate(seed: int, devices: int, ticks: int) -> tuple[np.ndarray, np.ndarray, list[Frame]]:
    """Features and labels of a simulator run (and its frames, for scoring)."""
    sim = FleetSimulator(devices=devices, seed=seed, spike_prob=0.004, stuck_prob=0.0008)
    idx = DeviceIndex()
    dev = idx.indices(sim.device_ids)
    feats = Features()
    xs, ys, frames = [], [], []
    t0 = 1_763_800_000_000
    for k in range(ticks):
        tick = sim.tick(t0 + k * 1000)
        f = Frame(
            dev=dev,
            ts_ms=np.full(devices, tick.ts_ms, dtype=np.int64),
            seq=np.full(devices, k),
            cols={m: tick.values[m].astype(np.float64) for m in FEATURE_METRICS},
            boot_id="t",
        )
        frames.append(f)
        z, run = feats.update(f, FEATURE_METRICS)
        xs.append(feature_matrix(z, run))
        ys.append(tick.fault != 0)
    return np.vstack(xs), np.concatenate(ys), frames


def pr(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    tp = int((pred & y).sum())
    return tp / max(int(pred.sum()), 1), tp / max(int(y.sum()), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--ticks", type=int, default=1500)
    args = ap.parse_args()
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier

    t = time.time()
    x, y, _ = simulate(seed=11, devices=args.devices, ticks=args.ticks)
    print(f"train: {x.shape[0]} readings, {int(y.sum())} faulty ({time.time() - t:.1f}s)")
    clf = GradientBoostingClassifier(n_estimators=40, max_depth=3, learning_rate=0.2, random_state=0)
    clf.fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(onx.SerializeToString())
    # held-out run: other seed, other devices, through the exported model
    xh, yh, frames = simulate(seed=99, devices=args.devices // 2, ticks=args.ticks)
    scorer = OnnxScorer(args.out)
    p = scorer.predict(xh) >= OnnxScorer.default_threshold
    prec, rec = pr(p, yh)
    ew = EwmaScorer()
    pe = np.concatenate([ew.score(f) for f in frames]) >= EwmaScorer.default_threshold
    eprec, erec = pr(pe, yh)
    report = {
        "model": args.out.name,
        "trained_on": {"seed": 11, "devices": args.devices, "ticks": args.ticks},
        "held_out": {
            "seed": 99,
            "devices": args.devices // 2,
            "ticks": args.ticks,
            "readings": int(yh.shape[0]),
            "faulty": int(yh.sum()),
        },
        "onnx": {
            "threshold": OnnxScorer.default_threshold,
            "precision": round(prec, 4),
            "recall": round(rec, 4),
        },
        "ewma_baseline": {
            "threshold": EwmaScorer.default_threshold,
            "precision": round(eprec, 4),
            "recall": round(erec, 4),
        },
        "bytes": args.out.stat().st_size,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
