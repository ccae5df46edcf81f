"""Anomaly scorers on simulator data with labelled faults."""

from __future__ import annotations

import numpy as np

from fieldmesh.edge.frame import DeviceIndex, Frame
from fieldmesh.edge.infer import DEFAULT_MODEL, EwmaScorer, OnnxScorer
from fieldmesh.edge.simulator import FAULT_SPIKE, METRICS, FleetSimulator


def _run(
    scorer: EwmaScorer | OnnxScorer, seed: int, devices: int = 40, ticks: int = 600, batch_ticks: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    sim = FleetSimulator(devices=devices, seed=seed, spike_prob=0.004, stuck_prob=0.0008)
    idx = DeviceIndex()
    dev = idx.indices(sim.device_ids)
    scores, labels = [], []
    for k0 in range(0, ticks, batch_ticks):
        cols: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
        ts = []
        for k in range(k0, k0 + batch_ticks):
            tick = sim.tick(1_763_800_000_000 + k * 1000)
            for m in METRICS:
                cols[m].append(tick.values[m])
            ts.append(np.full(devices, tick.ts_ms))
            labels.append(tick.fault)
        f = Frame(
            dev=np.tile(dev, batch_ticks),
            ts_ms=np.concatenate(ts).astype(np.int64),
            seq=np.zeros(devices * batch_ticks, dtype=np.int64),
            cols={m: np.concatenate(v) for m, v in cols.items()},
            boot_id="t",
        )
        scores.append(scorer.score(f))
    return np.concatenate(scores), np.concatenate(labels)


def test_ewma_flags_spikes() -> None:
    s, y = _run(EwmaScorer(), seed=5)
    pred = s >= EwmaScorer.default_threshold
    spikes = y == FAULT_SPIKE
    assert spikes.sum() > 50
    assert (pred & spikes).sum() / spikes.sum() >= 0.9
    assert (pred & (y != 0)).sum() / max(pred.sum(), 1) >= 0.9


def test_shipped_onnx_model_on_a_held_out_run() -> None:
    assert DEFAULT_MODEL.exists() and DEFAULT_MODEL.stat().st_size < 200_000
    s, y = _run(OnnxScorer(), seed=1234)
    pred = s >= OnnxScorer.default_threshold
    faults = y != 0
    precision = (pred & faults).sum() / max(pred.sum(), 1)
    recall = (pred & faults).sum() / faults.sum()
    assert faults.sum() > 500
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_batching_does_not_change_scores() -> None:
    """Scores depend on the readings, not on how they were batched (state steps per occurrence)."""
    a, _ = _run(EwmaScorer(), seed=3, devices=5, ticks=100, batch_ticks=1)
    b, _ = _run(EwmaScorer(), seed=3, devices=5, ticks=100, batch_ticks=10)
    np.testing.assert_allclose(a, b)
