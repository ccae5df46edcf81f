"""``fieldmesh up`` with the gateway writing the v1 (row) bus encoding, which processors still read: exact end to end.

The other end-to-end tests run the default, v2 (columnar).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from e2e.test_up import check_exact
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration


def test_exact_through_the_whole_pipeline_on_bus_encoding_1(tmp_path: Path):
    prefix = f"v1e{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix)
    bad, good_in_bad = malformed(prefix)
    up = Up(tmp_path / "data", env={"FIELDMESH__GATEWAY__BUS_ENCODING": "1"}).start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, stream["messages"] + bad)
        check_exact(up, stream["sent"] + good_in_bad, MALFORMED_REASONS)
        assert up.get("/stats")["late"] >= 5  # the very late readings
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
