"""Jobs and rollouts end to end: the controller and simulated edge agents on a real Mosquitto."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fieldmesh.control.jobs import JobSpec, Targets
from fieldmesh.control.rollouts import RolloutSpec
from fieldmesh.edge.fleetsim import SimFleet
from fieldmesh.store.jobs import JobStore
from fieldmesh.store.registry import DeviceRegistry
from fmtest.fleet import artifact, controller, seed, signing_key, wait_for
from fmtest.mqtt import PrivateMosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    b = PrivateMosquitto(tmp_path / "mosquitto")
    yield b
    b.stop()


def test_a_job_across_agents_with_a_timeout_and_a_retry(tmp_path: Path, broker: PrivateMosquitto) -> None:
    store = JobStore(f"sqlite:///{tmp_path}/store.db")
    _, trusted = signing_key()
    devs = [f"agent-{i}" for i in range(6)]

    async def go() -> None:
        async with SimFleet(host="127.0.0.1", port=broker.port, devices=devs, root=tmp_path / "fleet",
                            trusted_keys=trusted, offline={"agent-5"}, per_connection=2) as fleet, \
                controller(store, broker.port) as ctl:
            ctl.create_job(JobSpec(job_id="j1", document={"op": "report"}, targets=Targets(devices=tuple(devs)),
                                   timeout_s=1.5, max_attempts=2), actor="test")
            await wait_for(lambda: store.get_job("j1").status == "completed", 20, "job j1 to complete")
            assert fleet.counts()["succeeded"] == 5
        exs = {e.device_id: e for e in store.executions(job_id="j1")}
        assert {d: e.state for d, e in exs.items()} == {**{d: "succeeded" for d in devs[:5]},
                                                        "agent-5": "timed_out"}
        assert exs["agent-5"].attempt == 2  # retried once, then timed out again
        assert exs["agent-5"].details["previous"]["state"] == "timed_out"
        assert exs["agent-0"].details == {"firmware": None, "model": None}
        assert ctl.stats.timeouts == 2 and ctl.stats.retries == 1

    asyncio.run(go())


def test_a_tampered_artifact_is_refused_on_the_device(tmp_path: Path, broker: PrivateMosquitto) -> None:
    store = JobStore(f"sqlite:///{tmp_path}/store.db")
    key, trusted = signing_key()
    other, _ = signing_key()
    good, good_bytes = artifact(key, "2.0")
    tampered = bytearray(good_bytes)
    tampered[10] ^= 0xFF
    forged, forged_bytes = artifact(other, "2.1")  # signed by a key the devices do not trust
    tricked = dict(good, version="9.9")  # the manifest changed after it was signed
    tricked["url"] = "https://artifacts.example/tricked.bin"
    good["url"] = "https://artifacts.example/tampered.bin"
    arts = {good["url"]: bytes(tampered), forged["url"]: forged_bytes, tricked["url"]: good_bytes}
    devs = ["dev-a", "dev-b", "dev-c"]

    async def go() -> None:
        async with SimFleet(host="127.0.0.1", port=broker.port, devices=devs, root=tmp_path / "fleet",
                            trusted_keys=trusted, artifacts=arts) as fleet, controller(store, broker.port):
            for job_id, dev, m in (("t1", "dev-a", good), ("t2", "dev-b", forged), ("t3", "dev-c", tricked)):
                store.create_job(JobSpec(job_id=job_id, document={"op": "install", "artifact": m},
                                         targets=Targets(devices=(dev,)), timeout_s=10), [dev], actor="test")
            await wait_for(lambda: all(store.get_job(j).status == "completed" for j in ("t1", "t2", "t3")), 20,
                           "the install jobs")
            for d in devs:
                assert fleet.version(d) is None  # nothing installed
                assert not (tmp_path / "fleet" / d / "model" / "a.bin").exists()
        got = {e.job_id: (e.state, e.details.get("reason")) for e in store.executions()}
        assert got == {"t1": ("rejected", "hash_mismatch"), "t2": ("rejected", "unknown_key"),
                       "t3": ("rejected", "bad_signature")}

    asyncio.run(go())


def test_a_bad_model_halts_the_rollout_in_its_first_stage_and_devices_roll_back(
        tmp_path: Path, broker: PrivateMosquitto) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    store, reg = JobStore(url), DeviceRegistry(url)
    key, trusted = signing_key()
    v1, v1_bytes = artifact(key, "1.0")
    v2, v2_bytes = artifact(key, "2.0")
    devs = [f"pump-{i:03d}" for i in range(120)]
    canary = devs[:12]
    for d in devs:
        reg.add(d, groups=["canary"] if d in canary else [], actor="test")
    failing = set(devs[::10])  # 12 devices, 2 of them in the canary group
    spec = RolloutSpec.from_dict({
        "rollout_id": "r1", "artifact": v2, "targets": {"query": {"status": "active"}},
        "canary_group": "canary", "stages": [10, 50, 100], "rate_per_s": 40, "max_in_flight": 6,
        "timeout_s": 10, "bake_s": 0.5, "gates": {"max_failure_rate": 0.05, "min_samples": 10}})
    store.create_rollout("r1", spec.as_dict(), actor="test")

    async def go() -> None:
        async with SimFleet(host="127.0.0.1", port=broker.port, devices=devs, root=tmp_path / "fleet",
                            trusted_keys=trusted, artifacts={v1["url"]: v1_bytes, v2["url"]: v2_bytes},
                            failing=failing, per_connection=40) as fleet, \
                controller(store, broker.port, devices=lambda: reg.list(limit=10_000)):
            seed(fleet.slots, devs, v1, v1_bytes)
            await wait_for(lambda: store.get_rollout("r1").status not in ("pending", "running", "halted"), 60,
                           "the rollout to end")
            ro = store.get_rollout("r1")
            assert ro.status == "rolled_back", ro.progress.get("halt_reason")
            p = ro.progress
            assert p["stage"] == 0, "halted in the canary stage"
            assert "failure_rate" in p["halt_reason"]
            exposed = {e.device_id for e in store.executions(job_id="r1-s0") if e.sent_ms is not None}
            assert exposed <= set(canary)
            assert not store.executions(job_id="r1-s1")
            assert p["rollback"].get("succeeded") == len(exposed)
            for d in devs:
                assert fleet.version(d) == "1.0", d  # everyone on the previous version
            failed = {e.device_id for e in store.executions(job_id="r1-s0") if e.state == "failed"}
            assert failed and failed <= failing & exposed
            for d in failed:
                assert fleet.slots(d).reverts == 1  # reverted by the agent itself; the rollback found it back

    asyncio.run(go())
