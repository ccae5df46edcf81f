"""A full disk under ``fieldmesh up`` (data dir on a 64 MiB tmpfs): nothing acknowledged is lost.

nats-server's MQTT listener acknowledges a QoS 1 publish once its own ``$MQTT_msgs`` store took it,
whatever happens to the stream that captures it (FM_INGEST): on a full disk it PUBACKs and loses.
So the supervisor closes the MQTT door while free space is below the reserve; the device keeps its
readings and retries. The processor meets the full disk in SQLite: it retries the batch, acks
nothing, and /health says why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.dataset import make_stream
from faults.test_kill9 import check_exact, child_of, health
from fmtest import oracle
from fmtest.faults import FaultReport
from fmtest.procs import Up
from fmtest.retry import RetryingPublisher

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs (root may mount one: the fault suite runs as root in CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a 64 MiB tmpfs (run the fault suite as root): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        # keep the logs for a post-mortem: the tmpfs goes away
        subprocess.run(["sh", "-c", f"mkdir -p {tmp_path}/kept && cp -r {disk}/*.log {disk}/data/logs "
                        f"{disk}/data/nats/nats-server.log {tmp_path}/kept/"], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Write a filler file until only about ``leave_bytes`` are free (0: none, to the last block)."""
    path = disk / "filler"
    with open(path, "ab", buffering=0) as f:
        for size in (256 * 1024, 4096):  # big steps, then blocks: a 256 KiB step alone leaves up to 256 KiB
            try:
                while True:
                    st = os.statvfs(disk)
                    if st.f_bavail * st.f_frsize < leave_bytes + size:
                        break
                    f.write(b"\0" * size)
            except OSError:
                pass  # the disk is full
    return path


def door_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait(pred: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_disk_full_loses_nothing_acknowledged(small_disk: Path) -> None:
    prefix = f"df{uuid.uuid4().hex[:6]}"
    # A small head first, then a backlog many times larger: after a checkpoint SQLite writes the WAL
    # again from its start, so a backlog that fitted in the WAL file's size so far (what the head and
    # the schema wrote) would be stored on a full disk, and the store would never fail.
    stream = make_stream(prefix, devices=60, per_device=150, seed=21)
    msgs = stream["messages"]
    head = 40
    up = Up(small_disk / "data", env={"FIELDMESH__RUNTIME__DISK_RESERVE_MB": "16",
                                      "FIELDMESH__RUNTIME__STALL_AFTER_S": "3"}).start()
    try:
        dev = RetryingPublisher(up.mqtt_port, settle_s=2.0).connect()
        third = len(msgs) // 3
        assert dev.send(msgs[:head]) == head
        up.wait_for(lambda s: sum(s["lag"].values()) == 0 and s["received"] > 0)
        proc = child_of(up, "processor")
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)  # readings pile up in the bus, to meet the full disk in SQLite
        assert dev.send(msgs[head : 2 * third]) == 2 * third - head
        up.wait_for(lambda s: s["lag"].get("gateway", 1) == 0, timeout_s=30)
        filler = fill(small_disk, 8 << 20)  # below the reserve: the door closes
        wait(lambda: health(up).get("disk", "ok").startswith("low"), 10, "/health disk: low")
        wait(lambda: not door_open(up.mqtt_port), 10, "the MQTT door to close")
        wait(lambda: health(up).get("bus") == "ok", 10, "nats-server back without its MQTT listener")
        fill(small_disk, 0)  # then something else takes the rest: SQLite cannot write
        h = health(up)
        assert h["status"] == "degraded", h
        rest: list[int] = []
        t = threading.Thread(target=lambda: rest.append(dev.send(msgs[2 * third :], timeout_s=120)), daemon=True)
        t.start()  # the device keeps trying while the door is closed
        os.kill(proc.pid, signal.SIGCONT)
        wait(lambda: "store write failed" in str(health(up).get("processor")), 20,
             "/health processor: stalled, naming the store write failure")
        h_full = health(up)
        time.sleep(2)
        assert child_of(up, "processor").pid == proc.pid  # retrying in place: no crash, no restart loop
        filler.unlink()  # space comes back
        wait(lambda: door_open(up.mqtt_port), 15, "the MQTT door to open again")
        t.join(120)
        assert rest == [len(msgs) - 2 * third]
        stats = check_exact(up, stream["sent"])
        wait(lambda: health(up)["status"] == "ok", 20, "/health ok again")
        FaultReport("disk full (64 MiB tmpfs): door closed, SQLite full, then space back", sent=len(stream["sent"]),
                    acknowledged=len(stream["sent"]), stored=stats["stored"], duplicates=stats["duplicates"],
                    counted_losses={k: v for k, v in stats["dead_lettered"].items() if k != "total"}).show()
        print(f"[fault] /health while full: disk={h_full.get('disk')!r} processor={h_full.get('processor')!r}")
        dev.close()
    finally:
        assert up.stop() == 0, up.tail()
    log = " ".join((small_disk / "data-up.log").read_text(errors="replace").split())  # the console wraps lines
    assert "the MQTT door is closed" in log and "the MQTT door is open again" in log
    # no stage crashed meanwhile: nats-server restarts (the door), a disk without room for a worker's files
    assert re.findall(r"\w+ exited \(-?\d+\)", log) == [], log


def _one_per_device(devs: list[str], seq: int, ts: int) -> tuple[list[tuple[str, dict[str, Any]]],
                                                                    list[tuple[str, bytes]]]:
    """A reading per device with this seq: what was sent and its MQTT messages."""
    sent = [(d, {"ts": ts, "seq": seq, "boot_id": "b1", "measurements": {"temperature": 20.0}}) for d in devs]
    return sent, [(f"devices/{d}/telemetry", json.dumps({"device_id": d, **r}).encode()) for d, r in sent]


def test_jetstream_budget_withholds_the_puback(small_disk: Path, tmp_path: Path) -> None:
    """JetStream may use the free space above the reserve, no more: past it the MQTT listener gives no
    PUBACK (the device retries), so the disk never fills under JetStream; space back, all is stored."""
    prefix = f"jb{uuid.uuid4().hex[:6]}"
    # about 5 MB through JetStream, well past its budget of ~2 MiB (a smaller stream could fit in it);
    # seqs from 1: each device's seq 0 goes first and its seq 151 last (see below)
    per_device = 150
    stream = make_stream(prefix, devices=100, per_device=per_device, seed=22, first_seq=1)
    msgs = stream["messages"]
    devs = sorted({d for d, _ in stream["sent"]})
    start = stream["now"] - 2 * 3_600_000
    head_sent, head = _one_per_device(devs, 0, start - 30_000)
    tail_sent, tail = _one_per_device(devs, per_device + 1, start + (per_device + 1) * 30_000)
    # 2 MiB above the reserve and its quarter of headroom before up starts: JetStream's budget
    filler = fill(small_disk, (16 << 20) + (4 << 20) + (2 << 20))
    # the hot store on another disk: only JetStream grows here, up to its budget
    up = Up(small_disk / "data", "--store-url", f"sqlite:///{tmp_path / 'store.db'}",
            env={"FIELDMESH__RUNTIME__DISK_RESERVE_MB": "16"})
    up.start()
    try:
        dev = RetryingPublisher(up.mqtt_port, settle_s=2.0).connect()
        assert dev.send(head) == len(head)  # far below the budget
        acked: list[int] = []
        t = threading.Thread(target=lambda: acked.append(dev.send(msgs, timeout_s=120)), daemon=True)
        t.start()
        seen: set[str] = set()

        def refused() -> bool:
            seen.add(str(health(up).get("disk", "?"))[:4])
            return bool(seen & {"full", "low:"})

        wait(refused, 60, "/health disk: full (JetStream at its budget)")
        assert "full" in seen, seen
        assert t.is_alive(), "every message was acknowledged though the disk had no room for them"
        time.sleep(2)
        assert os.statvfs(small_disk).f_bavail > 0, "the disk ran full under JetStream"
        filler.unlink()  # space comes back
        t.join(150)
        assert acked == [len(msgs)]
        assert dev.send(tail) == len(tail)  # space is back
        # Known limit (docs/operations.md, "A full disk"): each time JetStream meets its budget,
        # nats-server's MQTT listener can PUBACK a message (its own $MQTT_msgs store took it) whose
        # capture into FM_INGEST was refused. Seen here in about 1 run in 7 (1 to 35 readings of 15,000),
        # on CI 59 and 155.
        # Such a loss is never silent: each missing reading is a seq gap, which a later reading of
        # its device reveals; here each device's first and last readings went while there was room,
        # so every reading lost between them is counted. So: all stored, or every missing reading
        # counted in `gaps`, and few (unguarded, 99% were lost).
        sent = head_sent + stream["sent"] + tail_sent
        uniq = len(oracle.unique_readings(sent))
        stats = up.wait_for(lambda s: sum(s["lag"].values()) == 0 and s["stored"] + s["gaps"] >= uniq, 60)
        assert stats["stored"] + stats["gaps"] == uniq, stats
        assert stats["gaps"] <= uniq // 20, stats  # only what was in flight when JetStream met its budget
        if stats["gaps"] == 0:
            check_exact(up, sent)
        wait(lambda: health(up)["status"] == "ok", 30, "/health ok again")
        FaultReport("JetStream budget (disk reserve) on a 64 MiB tmpfs", sent=len(sent), acknowledged=len(sent),
                    stored=stats["stored"], duplicates=stats["duplicates"],
                    counted_losses={"gaps (PUBACKed at the budget's edge, not captured)": stats["gaps"],
                                    **{k: v for k, v in stats["dead_lettered"].items() if k != "total"}}).show()
        print(f"[fault] /health disk states seen: {sorted(seen)}; publishes {dev.publishes}")
        dev.close()
    finally:
        assert up.stop() == 0, up.tail()


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
def test_edge_buffer_on_a_full_disk(small_disk: Path, policy: str) -> None:
    """ENOSPC in the edge buffer: ``block`` refuses (the agent holds its source back), ``drop_oldest``
    drops the oldest records and counts them; no torn record either way; space back, it appends again."""
    from fieldmesh.edge.buffer import BufferFull, DiskBuffer

    buf = DiskBuffer(path=small_disk / "buf", max_bytes=1 << 30, segment_bytes=1 << 20, full_policy=policy,
                     fsync="always")
    payload = b"r" * 4000
    filler = fill(small_disk, 3 << 20)  # ~3 MiB left for the buffer
    appended = refused = 0
    for _ in range(2000):  # ~8 MB: more than the disk has
        try:
            buf.append(payload, 10)
            appended += 1
        except BufferFull:
            refused += 1
    assert buf.stats.disk_full >= 1
    if policy == "block":
        assert refused > 0 and buf.stats.dropped_readings == 0
    else:
        assert refused == 0 and buf.stats.dropped_readings > 0
    kept = buf.pending_readings
    assert kept + buf.stats.dropped_readings == 10 * appended  # every loss is counted
    filler.unlink()
    buf.append(payload, 10)  # space is back
    buf.close()
    again = DiskBuffer(path=small_disk / "buf")
    assert again.stats.corrupt_records == 0
    assert sum(r.count for r in again.read(max_records=100_000)) == kept + 10
    FaultReport(f"edge buffer on a full disk ({policy})", sent=10 * (appended + refused + 1),
                acknowledged=10 * (appended + 1), stored=kept + 10, duplicates=0,
                counted_losses={"dropped_readings": buf.stats.dropped_readings, "refused": 10 * refused}).show()


_COUNT_ONE = ("import sys; from fieldmesh.obs.metrics import PROCESSOR_BATCHES, PROCESSOR_APPLY_SECONDS; "
              "PROCESSOR_BATCHES.inc(); PROCESSOR_APPLY_SECONDS.observe(0.01); print('counted', flush=True)")
_RAW_PROMETHEUS = ("from prometheus_client import Counter, Histogram; Counter('c', 'c').inc(); "
                   "Histogram('h', 'h').observe(1.0); print('counted', flush=True)")


def test_a_worker_started_on_a_full_disk_waits_for_space_instead_of_dying(small_disk: Path) -> None:
    """prometheus-client maps a sparse file for each process's metrics: on a full disk its first write dies of
    SIGBUS (the gateway did, in a restart loop, while `up` had its MQTT door closed). fieldmesh allocates the
    files' blocks first: a worker started on a full disk waits, says why, and counts once space is back."""
    metrics = small_disk / "metrics"
    metrics.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    filler = fill(small_disk, 0)
    raw = subprocess.run([sys.executable, "-c", _RAW_PROMETHEUS], env=env, capture_output=True, text=True, timeout=60)
    assert raw.returncode == -signal.SIGBUS, (raw.returncode, raw.stderr)  # what the files do without their blocks
    for f in metrics.iterdir():
        f.unlink()
    fill(small_disk, 0)
    errfile = small_disk.parent / "worker.err"
    with open(errfile, "w") as errs:
        worker = subprocess.Popen([sys.executable, "-c", _COUNT_ONE], env=env, stdout=subprocess.PIPE,
                                  stderr=errs, text=True)
    try:
        wait(lambda: "waiting for space" in errfile.read_text(), 30, "the worker to say it waits for space")
        time.sleep(1)
        assert worker.poll() is None, worker.communicate()  # waiting, alive
        filler.unlink()
        out, _ = worker.communicate(timeout=30)
    finally:
        worker.kill()
    err = errfile.read_text()
    assert worker.returncode == 0, err
    assert out.strip() == "counted"
    assert "no disk space for the metric file" in err
    files = sorted(metrics.iterdir())
    assert [f.name.split("_")[0] for f in files] == ["counter", "histogram"]
    for f in files:  # blocks allocated, not a sparse file
        st = f.stat()
        assert st.st_size >= 256 * 1024 and st.st_blocks * 512 >= st.st_size, (f, st)
