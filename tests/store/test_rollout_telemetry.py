"""Rollout gates over the hot store's readings: cohort statistics, and a rollout halted by its anomaly gate."""

from __future__ import annotations

import json
import time

from fieldmesh.control.jobrunner import JobController
from fieldmesh.control.rollouts import RolloutSpec
from fieldmesh.core.codec import decode_telemetry
from fieldmesh.store import HotStore
from fieldmesh.store.jobs import JobStore
from fieldmesh.store.rollouts import telemetry_for
from fmtest.drive import commit_readings
from fmtest.fleet import artifact, signing_key


def _readings(store: HotStore, dev: str, start_ms: int, n: int, anomalies: int, temp: float) -> None:
    rows = [{"ts": start_ms + i * 100, "seq": i, "boot_id": f"b{start_ms}",
             "measurements": {"temperature": temp, "h.rel": 1.0},
             "meta": {"anomaly_score": 9.0 if i < anomalies else 0.1,
                      "decision": "anomaly" if i < anomalies else "normal"}} for i in range(n)]
    rs = decode_telemetry(json.dumps(rows).encode(), device_id=dev, topic=f"devices/{dev}/telemetry",
                          received_ms=start_ms + n * 100).readings
    commit_readings(store, rs)


def test_cohort_statistics(store: HotStore, store_url: str) -> None:
    now = int(time.time() * 1000)
    _readings(store, "a", now - 60_000, 10, 3, 20.0)
    _readings(store, "b", now - 1_000, 10, 0, 30.0)
    _readings(store, "c", now - 3_600_000, 10, 10, 99.0)  # before the cohort's start
    tel = telemetry_for(store_url)
    s = tel.cohort(["a", "b", "c", "d"], since_ms=now - 120_000, fresh_since_ms=now - 10_000, metric="temperature")
    assert (s.devices, s.reporting, s.readings, s.anomalies, s.fresh) == (4, 2, 20, 3, 1)
    assert s.anomaly_rate == 0.15 and s.metric_mean == 25.0
    dotted = tel.cohort(["a"], since_ms=0, fresh_since_ms=0, metric="h.rel")
    assert dotted.metric_mean == 1.0
    assert tel.cohort([], since_ms=0, fresh_since_ms=0, metric=None).readings == 0
    tel.store.close()


def test_a_rollout_halts_when_updated_devices_flag_anomalies(store: HotStore, store_url: str) -> None:
    key, _ = signing_key()
    m, _ = artifact(key, "2.0")
    devs = [f"d{i}" for i in range(20)]
    spec = RolloutSpec.from_dict({
        "rollout_id": "r2", "artifact": m, "targets": {"devices": devs}, "canary": 6, "stages": [100],
        "rate_per_s": 0, "gates": {"max_failure_rate": 0.5, "min_samples": 5, "max_anomaly_rate_delta": 0.1,
                                   "min_devices": 5, "metric": "temperature", "max_metric_delta": 50}})
    js = JobStore(store_url)
    js.create_rollout("r2", spec.as_dict(), actor="test")
    tel = telemetry_for(store_url)
    ctl = JobController(js, publish=lambda t, p, r: True, telemetry=tel)
    ctl.tick()
    ctl.tick()
    canary = [e.device_id for e in js.executions(job_id="r2-s0")]
    assert len(canary) == 6
    start = js.get_rollout("r2").progress["started_ms"]
    for d in devs:  # the new model flags 40% of readings on the updated devices; the others 2%
        _readings(store, d, start + 10, 50, 20 if d in canary else 1, 21.0)
    for d in canary:
        ctl.handle_message(f"devices/{d}/jobs/r2-s0/update", b'{"execution": 1, "status": "succeeded"}')
    ctl.tick()
    ro = js.get_rollout("r2")
    gates = {g["name"]: g for g in ro.progress["gates"]}
    assert ro.status == "halted", gates
    assert gates["failure_rate"]["ok"] is True
    assert abs(gates["anomaly_rate_delta"]["value"] - (0.4 - 0.02)) < 1e-9
    assert gates["anomaly_rate_delta"]["ok"] is False
    assert gates["metric_delta:temperature"] == {"name": "metric_delta:temperature", "value": 0.0, "threshold": 50,
                                                 "ok": True}
    assert "anomaly_rate_delta" in ro.progress["halt_reason"]
    assert sorted(e.device_id for e in js.executions(job_id="r2-rollback")) == sorted(canary)
    js.close()
    tel.store.close()
