"""Writers opening the same new SQLite store at the same moment all succeed (WAL switch and schema set-up)."""

from __future__ import annotations

import threading
from pathlib import Path

from fieldmesh.store import load_store


def test_writers_opening_a_new_store_at_once(tmp_path: Path) -> None:
    failed: list[BaseException] = []
    for r in range(40):
        url = f"sqlite:///{tmp_path / f's{r}.db'}"
        barrier = threading.Barrier(3, timeout=30)

        def open_close(url: str = url, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                load_store(url).close()
            except BaseException as exc:  # collected and asserted below
                failed.append(exc)

        threads = [threading.Thread(target=open_close) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        s = load_store(url, readonly=True)
        try:
            assert s.stats().stored == 0 and s.query("SELECT count(*) FROM readings").rows == [(0,)]
        finally:
            s.close()
    assert not failed, failed[:3]
