"""The disk buffer: order, acknowledgement, recovery from torn and corrupt data, and the full policies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.edge.buffer import HEADER_SIZE, BufferFull, DiskBuffer


def _fill(buf: DiskBuffer, n: int, size: int = 100) -> list[bytes]:
    out = []
    for i in range(n):
        p = f"{i:08d}".encode() * (size // 8)
        buf.append(p, 3)
        out.append(p)
    return out


def test_order_ack_and_reopen(tmp_path: Path) -> None:
    buf = DiskBuffer(path=tmp_path, segment_bytes=1000)
    payloads = _fill(buf, 30)
    got = buf.read(max_records=10)
    assert [r.payload for r in got] == payloads[:10]
    buf.ack(got[-1].seq)
    buf.close()
    buf2 = DiskBuffer(path=tmp_path, segment_bytes=1000)
    assert buf2.stats.recovered_records == 20 and buf2.stats.recovered_readings == 60
    rest = buf2.read(max_records=100)
    assert [r.payload for r in rest] == payloads[10:]
    assert [r.seq for r in rest] == list(range(11, 31))
    # not acked: a rewind reads the same again
    buf2.rewind()
    assert [r.seq for r in buf2.read(max_records=5)] == [11, 12, 13, 14, 15]
    buf2.ack(30)
    assert buf2.pending_records == 0
    assert not list(tmp_path.glob("*.seg")), "fully acknowledged segments are deleted"
    assert buf2.append(b"x", 1) == 31


def test_max_readings_bounds_a_read(tmp_path: Path) -> None:
    buf = DiskBuffer(path=tmp_path)
    _fill(buf, 10)
    assert len(buf.read(max_readings=7)) == 2  # 3 readings each
    assert len(buf.read(max_readings=1)) == 1  # at least one record


def test_torn_tail_is_set_aside_and_counted(tmp_path: Path) -> None:
    buf = DiskBuffer(path=tmp_path)
    payloads = _fill(buf, 5)
    buf.close()
    seg = next(tmp_path.glob("*.seg"))
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # a write torn in the middle of the last record
        f.truncate(size - 40)
    buf2 = DiskBuffer(path=tmp_path)
    assert buf2.stats.corrupt_records == 1
    assert buf2.stats.corrupt_bytes == len(payloads[-1]) + HEADER_SIZE - 40
    assert [r.payload for r in buf2.read()] == payloads[:4]
    assert list((tmp_path / "quarantine").iterdir())
    assert buf2.append(b"next", 1) == 5  # the torn record's seq is reused: it never was durable


def test_corrupt_middle_record_resyncs(tmp_path: Path) -> None:
    buf = DiskBuffer(path=tmp_path)
    payloads = _fill(buf, 6)
    buf.close()
    seg = next(tmp_path.glob("*.seg"))
    rec = HEADER_SIZE + len(payloads[0])
    with open(seg, "r+b") as f:  # flip a byte inside the third record's payload
        f.seek(2 * rec + HEADER_SIZE + 10)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    buf2 = DiskBuffer(path=tmp_path)
    assert buf2.stats.corrupt_records == 1
    got = buf2.read()
    assert [r.payload for r in got] == payloads[:2] + payloads[3:]
    assert [r.seq for r in got] == [1, 2, 4, 5, 6]


def test_garbage_file_does_not_stop_the_agent(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000001.seg").write_bytes(os.urandom(5000))
    buf = DiskBuffer(path=tmp_path)
    assert buf.stats.corrupt_records >= 1
    assert buf.read() == []
    assert buf.append(b"ok", 1) >= 1


def test_drop_oldest_counts_exactly(tmp_path: Path) -> None:
    buf = DiskBuffer(path=tmp_path, max_bytes=5000, segment_bytes=1000, full_policy="drop_oldest")
    n = 200
    payloads = _fill(buf, n)
    kept = buf.read(max_records=10_000)
    assert buf.size_bytes <= 5000
    assert buf.stats.dropped_records + len(kept) == n
    assert buf.stats.dropped_readings == 3 * buf.stats.dropped_records
    # what is missing is exactly the oldest, counted ones
    assert [r.payload for r in kept] == payloads[buf.stats.dropped_records :]


def test_block_policy_raises_until_acked(tmp_path: Path) -> None:
    buf = DiskBuffer(path=tmp_path, max_bytes=3000, segment_bytes=1000, full_policy="block")
    with pytest.raises(BufferFull):
        _fill(buf, 100)
    appended = buf.stats.appended_records
    assert buf.stats.dropped_records == 0 and buf.stats.blocked == 1
    recs = buf.read(max_records=appended)
    buf.ack(recs[-1].seq)
    buf.append(b"after", 1)  # space again


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["append", "read", "ack", "rewind", "reopen"]), st.integers(1, 5)),
        max_size=60,
    )
)
def test_model_based(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]) -> None:
    """Whatever the interleaving, reads return appended-but-unacked records in seq order."""
    d = tmp_path_factory.mktemp("b")
    buf = DiskBuffer(path=d, segment_bytes=300)
    model: list[tuple[int, bytes]] = []
    acked = 0
    cursor = 0
    for op, k in ops:
        if op == "append":
            for _ in range(k):
                p = os.urandom(20)
                model.append((buf.append(p, 1), p))
        elif op == "read":
            got = buf.read(max_records=k)
            pend = [m for m in model if m[0] > max(acked, cursor)]
            assert [(r.seq, r.payload) for r in got] == pend[:k]
            if got:
                cursor = got[-1].seq
        elif op == "ack" and cursor > acked:
            acked = cursor
            buf.ack(acked)
        elif op == "rewind":
            buf.rewind()
            cursor = acked
        elif op == "reopen":
            buf.close()
            buf = DiskBuffer(path=d, segment_bytes=300)
            cursor = acked
    assert buf.pending_records == len([m for m in model if m[0] > acked])


_FULL_DISK = r"""
import json, resource, signal, sys
from fieldmesh.edge.buffer import BufferFull, DiskBuffer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
buf = DiskBuffer(path=sys.argv[1], segment_bytes=1 << 20, full_policy=sys.argv[2])
ok = full = 0
for i in range(100):
    try:
        buf.append(bytes([i % 256]) * 170, 2)
        ok += 1
    except BufferFull:
        full += 1
buf.close()
print(json.dumps({"ok": ok, "full": full, "dropped": buf.stats.dropped_readings,
                  "disk_full": buf.stats.disk_full}))
"""


@pytest.mark.parametrize("policy", ["drop_oldest", "block"])
def test_full_disk_applies_the_policy_without_corruption(tmp_path: Path, policy: str) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path), policy],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    r = json.loads(out.stdout)
    assert r["disk_full"] >= 1
    buf = DiskBuffer(path=tmp_path)
    assert buf.stats.corrupt_records == 0, "a failed write leaves no torn record behind"
    recs = buf.read(max_records=1000)
    if policy == "drop_oldest":
        assert r["full"] == 0 and r["ok"] == 100
        assert sum(x.count for x in recs) == 2 * 100 - r["dropped"]
        assert recs[-1].payload == bytes([99]) * 170
    else:
        assert r["full"] > 0 and r["dropped"] == 0
        assert len(recs) == r["ok"]
