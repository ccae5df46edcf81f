"""A rollout gated by a routed canary (docs/canary.md, docs/rollouts.md): the updated devices' readings of the
new firmware are held by the canary, drift from the baseline, and the canary's verdict `hold` halts the rollout."""

from __future__ import annotations

import json
import time

from fieldmesh.bus.base import BusRecord
from fieldmesh.control.jobrunner import JobController
from fieldmesh.control.rollouts import Gates, RolloutSpec, evaluate_gates
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch
from fieldmesh.core.model import BusBatch
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store import HotStore
from fieldmesh.store.canary import CanaryTables
from fieldmesh.store.jobs import JobStore
from fieldmesh.store.products import ProductTables
from fieldmesh.store.rollouts import telemetry_for
from fieldmesh.stream.canary import parse_canary
from fieldmesh.stream.processor import Processor
from fieldmesh.stream.products import ProductEngine
from fieldmesh.stream.quality import parse_product
from fmtest.fleet import artifact, signing_key


def test_a_rollout_halts_on_its_canarys_hold(store: HotStore, store_url: str) -> None:
    devs = [f"d{i}" for i in range(20)]
    pt = ProductTables(store_url)
    pt.put(parse_product({"name": "fleet", "devices": {"globs": ["d*"]}, "window_s": 60,
                          "metrics": {"temp": {"min": 0, "max": 50, "bins": 5}}}), actor="test")
    pt.close()
    ct = CanaryTables(store_url)
    ct.create(parse_canary({"name": "fw2", "product": "fleet", "meta": {"firmware": "2.*"},
                            "thresholds": {"min_readings": 20}}), actor="test")
    key, _ = signing_key()
    m, _ = artifact(key, "2.0")
    spec = RolloutSpec.from_dict({
        "rollout_id": "r3", "artifact": m, "targets": {"devices": devs}, "canary": 6, "stages": [100],
        "rate_per_s": 0, "gates": {"max_failure_rate": 0.5, "min_samples": 5, "canary": "fw2"}})
    js = JobStore(store_url)
    js.create_rollout("r3", spec.as_dict(), actor="test")
    tel = telemetry_for(store_url)
    ctl = JobController(js, publish=lambda t, p, r: True, telemetry=tel)
    ctl.tick()
    ctl.tick()
    updated = [e.device_id for e in js.executions(job_id="r3-s0")]
    assert len(updated) == 6
    # a closed window: the updated devices send firmware 2.0 readings 15 degrees hotter, the rest 1.0
    t0 = (int(time.time() * 1000) // 60_000 - 5) * 60_000
    rs = []
    for d in devs:
        fw, temp = ("2.0", 35.0) if d in updated else ("1.0", 20.0)
        for i in range(10):
            body = json.dumps({"ts": t0 + i * 5000, "seq": i, "measurements": {"temp": temp + i % 3},
                               "meta": {"firmware": fw}}).encode()
            rs += decode_telemetry(body, device_id=d, topic=f"devices/{d}/telemetry", received_ms=t0,
                                   max_skew_ms=10**12).readings
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     products=ProductEngine(store))
    proc._positions = store.positions()
    proc.apply_records([BusRecord(topic=READINGS_TOPIC, partition=0, offset=1, value=encode_bus_batch(BusBatch(rs)))])
    assert ct.canary("fw2")["readings"] == 60
    assert tel.canary_verdict("fw2") == "hold" and tel.canary_verdict("none") is None
    for d in updated:
        ctl.handle_message(f"devices/{d}/jobs/r3-s0/update", b'{"execution": 1, "status": "succeeded"}')
    ctl.tick()
    ro = js.get_rollout("r3")
    gates = {g["name"]: g for g in ro.progress["gates"]}
    assert ro.status == "halted", gates
    assert gates["canary:fw2"] == {"name": "canary:fw2", "value": 0.0, "threshold": 1.0, "ok": False}
    assert "canary:fw2" in ro.progress["halt_reason"] and "hold" in ro.progress["halt_reason"]
    ct.close()
    js.close()
    tel.store.close()


def test_the_canary_gate_judges_only_a_verdict() -> None:
    g = Gates(canary="fw2")
    for verdict, ok in (("promote", True), ("hold", False), ("no_data", None), (None, None)):
        (r,) = [r for r in evaluate_gates(g, final=0, failures=0, canary_verdict=verdict) if r.name == "canary:fw2"]
        assert r.ok is ok
