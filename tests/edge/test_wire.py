"""What the uplink puts on the wire decodes with the gateway's codec to the same readings."""

from __future__ import annotations

import itertools
import random
import time

import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.core.codec import decode_telemetry, encoding_for
from fieldmesh.edge.frame import WireReading
from fieldmesh.edge.uplink import (
    CONTENT_TYPE_ZSTD,
    backoff_delays,
    decode_record,
    encode_record,
    encode_uplink_message,
    publish_wire_bytes,
)

NOW = int(time.time() * 1000)

reading = st.builds(
    WireReading,
    ts=st.integers(NOW - 10**9, NOW),
    measurements=st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True),
        st.floats(-1e9, 1e9, allow_nan=False),
        min_size=1,
        max_size=4,
    ),
    seq=st.one_of(st.none(), st.integers(0, 2**40)),
    boot_id=st.one_of(st.none(), st.text("abc123", min_size=1, max_size=8)),
    meta=st.one_of(st.none(), st.just({"anomaly_score": 0.5, "decision": "normal"})),
)


@given(st.lists(reading, min_size=1, max_size=30), st.booleans())
def test_buffer_record_and_uplink_message_round_trip(readings: list[WireReading], v5: bool) -> None:
    groups = decode_record(encode_record([("dev-1", readings)]))
    assert groups == [("dev-1", readings)]
    topic, body, ct = encode_uplink_message("dev-1", groups[0][1], zstandard.ZstdCompressor(), v5=v5)
    assert ct == CONTENT_TYPE_ZSTD
    parts = topic.split("/")
    enc = encoding_for(ct if v5 else None, parts[3] if len(parts) > 3 else None)
    assert enc == "json+zstd"
    res = decode_telemetry(body, device_id="dev-1", topic=topic, received_ms=NOW, encoding=enc)
    assert not res.rejects
    assert [(r.ts_ms, r.seq, r.boot_id, r.measurements, r.meta) for r in res.readings] == [
        (r.ts, r.seq, r.boot_id, r.measurements, r.meta) for r in readings
    ]
    assert publish_wire_bytes(topic, body, ct, True) > len(body) + len(topic)


def test_backoff_is_capped_and_jittered() -> None:
    delays = list(itertools.islice(backoff_delays(0.2, 5.0, random.Random(1)), 50))
    assert all(0.1 <= d <= 5.0 for d in delays)
    assert max(delays[:3]) <= 0.8  # starts small
    assert len({round(d, 6) for d in delays[10:]}) > 30  # jittered, not a fixed cap
