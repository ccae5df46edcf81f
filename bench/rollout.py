"""Rollout benchmark: how many devices a bad version reaches before the rollout halts, and how fast the
devices it reached are back on the previous version.

    .venv/bin/python bench/rollout.py [--devices 1000] [--failing 0.03] [--trials 8]

A private Mosquitto, the job controller (its real loop, ticking every 50 ms, over a SQLite store) and
``--devices`` simulated devices (:class:`fieldmesh.edge.fleetsim.SimFleet`: the real edge job client,
signature check, A/B slots on disk, self-revert) sharing 10 MQTT connections. Every device runs version
1.0; ``--failing`` of them (fixed, drawn once) cannot start 2.0 (their health check fails and the agent
reverts by itself).

1. **Staged** (``--trials`` rollouts of 2.0, each its own rollout id, so its own device order): canary
   1%, then 10/50/100%, 50 installs/s, at most 5 in flight, gate ``max_failure_rate`` 1% over at least
   20 final installs (evaluated every tick, within stages too). Per trial: devices sent 2.0 before the
   halt (exposed), and the time from the halt until every exposed device is back on 1.0 (the rollback
   job plus the agents' own reverts). Targets: exposed <= 5% of the fleet; >= 99% of the failed devices
   back on 1.0 within 2 minutes.
2. **Baseline, naive all-at-once**: one stage of 100%, no pacing, no gate (the update a fleet gets
   without staging). Exposure and how many devices end on a version that failed elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fieldmesh.control.jobrunner import JobController, MqttLink, run_controller
from fieldmesh.control.rollouts import RolloutSpec, key_id, sign_artifact
from fieldmesh.edge.fleetsim import SimFleet
from fieldmesh.store.jobs import JobStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(d: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest file {d}/mosquitto.log\n"
                    "user root\nmax_queued_messages 10000\nmax_inflight_messages 100\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("mosquitto did not start") from None
            time.sleep(0.05)


async def wait(pred, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def sent_to(store: JobStore, progress: dict[str, object]) -> set[str]:
    """Devices a rollout sent its artifact to (any stage)."""
    stages = progress.get("stages") or []
    assert isinstance(stages, list)
    return {e.device_id for s in stages if s["job_id"] for e in store.executions(job_id=s["job_id"])
            if e.sent_ms is not None}


async def run(args: argparse.Namespace, tmp: Path, port: int) -> int:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    trusted = {key_id(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)): pub}
    arts: dict[str, bytes] = {}

    def art(version: str) -> dict[str, object]:
        data = f"model-{version}".encode() + secrets.token_bytes(4096)
        m: dict[str, object] = sign_artifact(key, data, kind="model", name="anomaly", version=version)
        m["url"] = f"https://artifacts.example/anomaly/{version}.bin"
        arts[str(m["url"])] = data
        return m

    v1, v2 = art("1.0"), art("2.0")
    devs = [f"dev-{i:05d}" for i in range(args.devices)]
    rng = random.Random(args.seed)
    failing = set(rng.sample(devs, round(args.failing * len(devs))))
    store = JobStore(f"sqlite:///{tmp}/store.db")
    holder: list[JobController] = []
    link = MqttLink(f"mqtt://127.0.0.1:{port}", on_message=lambda t, p: holder[0].handle_message(t, p))
    ctl = JobController(store, publish=link.publish)
    holder.append(ctl)
    if not link.wait_connected(10):
        raise SystemExit("the controller could not connect")
    stop = asyncio.Event()
    loop_task = asyncio.create_task(run_controller(ctl, stop=stop, tick_s=0.05))
    t0 = time.monotonic()
    async with SimFleet(host="127.0.0.1", port=port, devices=devs, root=tmp / "fleet", trusted_keys=trusted,
                        artifacts=arts, failing=failing, per_connection=-(-len(devs) // 10)) as fleet:
        for d in devs:
            s = fleet.slots(d)
            s.install(v1, arts[str(v1["url"])])
            s.boot("model")
            s.confirm("model")
        print(f"fleet: {len(devs)} devices on 1.0, {len(failing)} cannot run 2.0 "
              f"({len(failing) / len(devs):.1%}); set up in {time.monotonic() - t0:.1f}s")
        exposures: list[float] = []
        back_s: list[float] = []
        failed_back: list[float] = []
        stages: list[int] = []
        for t in range(args.trials):
            rid = f"staged{t}"
            spec = RolloutSpec.from_dict({
                "rollout_id": rid, "artifact": v2, "targets": {"devices": devs}, "canary": max(1, len(devs) // 100),
                "stages": [10, 50, 100], "rate_per_s": 50, "max_in_flight": 5, "timeout_s": 30, "bake_s": 1,
                "gates": {"max_failure_rate": 0.01, "min_samples": 20}})
            store.create_rollout(rid, spec.as_dict(), actor="bench")
            await wait(lambda: store.get_rollout(rid).status not in ("pending", "running"), 120)  # noqa: B023
            ro = store.get_rollout(rid)
            exposed = sent_to(store, ro.progress)
            ok = await wait(lambda: all(fleet.version(d) == "1.0" for d in exposed), 120)  # noqa: B023
            took = time.time() - ro.progress.get("halted_ms", time.time() * 1000) / 1000
            await wait(lambda: store.get_rollout(rid).status in ("rolled_back", "completed"), 60)  # noqa: B023
            exposures.append(len(exposed) / len(devs))
            back_s.append(took if ok else float("inf"))
            hit = exposed & failing
            failed_back.append(sum(fleet.version(d) == "1.0" for d in hit) / len(hit) if hit else 1.0)
            stages.append(int(ro.progress.get("stage", -1)))
            print(f"  trial {t}: {ro.status:11s} stage {ro.progress.get('stage')}, exposed {len(exposed):4d} "
                  f"({len(exposed) / len(devs):.1%}), failed among them {len(hit)}, all exposed back on 1.0 in "
                  f"{took:.2f}s; reason: {ro.progress.get('halt_reason')}")
        # the naive baseline: everything at once, no gate
        spec = RolloutSpec.from_dict({
            "rollout_id": "naive", "artifact": v2, "targets": {"devices": devs}, "canary": 0, "stages": [100],
            "rate_per_s": 0, "max_in_flight": 0, "timeout_s": 60, "bake_s": 0,
            "gates": {"max_failure_rate": None}})
        store.create_rollout("naive", spec.as_dict(), actor="bench")
        tn = time.monotonic()
        await wait(lambda: store.get_rollout("naive").status not in ("pending", "running"), 120)
        naive_s = time.monotonic() - tn
        nro = store.get_rollout("naive")
        n_exposed = len(sent_to(store, nro.progress))
        on_v2 = sum(fleet.version(d) == "2.0" for d in devs)
        n_failed = nro.progress.get("counts", {}).get("failed", 0)
    stop.set()
    await loop_task
    link.close()

    mean_exp = statistics.mean(exposures)
    naive_exp = n_exposed / len(devs)
    print()
    over = sum(e > 0.05 for e in exposures)
    floor = (1 - args.failing) ** (0.05 * len(devs) - 5)
    print(f"staged, {args.trials} trials: exposed before the halt mean {mean_exp:.2%} (target <= 5%), median "
          f"{statistics.median(exposures):.2%}, max {max(exposures):.2%}; halted in stage {sorted(set(stages))} "
          f"(0 = canary)")
    print(f"  trials over 5%: {over}/{len(exposures)}; a halt needs a failure to be seen, and the chance that none of "
          f"the first {0.05 * len(devs) - 5:.0f} devices sent is a failing one is {floor:.0%}")
    print(f"  failed devices back on 1.0: {min(failed_back):.1%} in the worst trial (target >= 99%); every exposed "
          f"device back on 1.0 in mean {statistics.mean(back_s):.2f}s, max {max(back_s):.2f}s (target 120 s)")
    print(f"naive all-at-once (baseline): {nro.status}, exposed {naive_exp:.1%} in {naive_s:.1f}s, {n_failed} failed "
          f"(reverted by their agents), {on_v2} devices left on 2.0 with nothing to stop it")
    print(f"ratio: staged exposure / naive exposure = {mean_exp / naive_exp:.3f} "
          f"({naive_exp / mean_exp:.0f}x fewer devices reached by the bad version)")
    print(f"controller: {ctl.stats}")
    met = mean_exp <= 0.05 and min(failed_back) >= 0.99 and max(back_s) <= 120
    print("targets met" if met else "TARGETS NOT MET")
    return 0 if met else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--failing", type=float, default=0.03)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # each agent's revert is a warning: a thousand lines
    tmp = Path(tempfile.mkdtemp(prefix="fm-bench-rollout-"))
    proc, port = start_mosquitto(tmp)
    try:
        return asyncio.run(run(args, tmp, port))
    finally:
        proc.terminate()
        proc.wait(10)
        if not os.environ.get("FM_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
