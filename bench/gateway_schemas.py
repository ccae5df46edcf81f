"""Cost per message of payloads written against a registered schema, beside plain JSON, in one run.

Each format carries the same one-reading telemetry (``ts``, ``seq``, ``boot_id``, two measurements):
plain JSON (no schema), and framed the Confluent way (magic byte, schema id) as JSON validated by a
JSON Schema, Avro (a flat record) and Protobuf (a message with a map of measurements). Two figures
per format, each the p50/p99 of many single-message timings (``perf_counter_ns``) with the schemas
already cached (ids are immutable; the first sight of an id costs one registry read, not measured):

- ``decode``: payload -> validated readings (what the schema adds is the difference to plain JSON);
- ``route``: ``route()`` of that one message, bus record included (a gateway routes batches: this is
  the dearest case, one message per batch).

Each figure is the lowest over ``--rounds`` passes (other processes on the machine inflate p99s).
Run: ``PYTHONPATH=src:bench .venv/bin/python bench/gateway_schemas.py [--n 20000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import time
from collections.abc import Callable
from typing import Any

from _common import percentile
from fastavro import schemaless_writer
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fieldmesh.core.codec import decode_telemetry
from fieldmesh.core.settings import GatewaySettings
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import _decode_with_schema, route
from fieldmesh.gateway.schemas import WireSchemas, build_decoder
from fieldmesh.schema.registry import FORMATS

NOW = 1_763_812_345_000
S = GatewaySettings()

AVRO = {"type": "record", "name": "Reading", "fields": [
    {"name": "ts", "type": "long"}, {"name": "seq", "type": "long"}, {"name": "boot_id", "type": "string"},
    {"name": "temperature", "type": "double"}, {"name": "pressure", "type": "double"}]}
JSON_SCHEMA = {"type": "object", "required": ["ts", "measurements"], "additionalProperties": False, "properties": {
    "ts": {"type": "integer"}, "seq": {"type": "integer", "minimum": 0}, "boot_id": {"type": "string"},
    "measurements": {"type": "object", "additionalProperties": {"type": "number"}}}}


def proto() -> tuple[Any, bytes]:
    fdp = descriptor_pb2.FileDescriptorProto(name="bench.proto", package="bench", syntax="proto3")
    m = fdp.message_type.add(name="Reading")
    e = m.nested_type.add(name="MeasurementsEntry")
    e.options.map_entry = True
    e.field.add(name="key", number=1, type=9, label=1)
    e.field.add(name="value", number=2, type=1, label=1)
    m.field.add(name="ts", number=1, type=3, label=1)
    m.field.add(name="seq", number=2, type=4, label=1)
    m.field.add(name="boot_id", number=3, type=9, label=1)
    m.field.add(name="measurements", number=4, type=11, label=3, type_name=".bench.Reading.MeasurementsEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Reading")), fdp.SerializeToString()


def formats(n: int) -> dict[str, tuple[list[IngestMessage], WireSchemas | None]]:
    import base64

    Msg, desc = proto()
    parsed = {1: ("JSON", FORMATS["JSON"].parse(json.dumps(JSON_SCHEMA), {})),
              2: ("AVRO", FORMATS["AVRO"].parse(json.dumps(AVRO), {})),
              3: ("PROTOBUF", FORMATS["PROTOBUF"].parse(base64.b64encode(desc).decode(), {}))}
    schemas = WireSchemas(lambda sid: build_decoder(sid, *parsed[sid]))

    def frame(sid: int, body: bytes) -> bytes:
        return b"\x00" + sid.to_bytes(4, "big") + body

    def avro(r: dict[str, Any]) -> bytes:
        fo = io.BytesIO()
        schemaless_writer(fo, parsed[2][1].parsed, r)
        return fo.getvalue()

    out: dict[str, list[bytes]] = {"plain JSON": [], "framed JSON": [], "Avro": [], "Protobuf": []}
    for i in range(n):
        r = {"ts": NOW - 1000 + i % 1000, "seq": i, "boot_id": "b1",
             "measurements": {"temperature": 20 + i % 50 / 4, "pressure": 1013.25}}
        plain = json.dumps(r, separators=(",", ":")).encode()
        out["plain JSON"].append(plain)
        out["framed JSON"].append(frame(1, plain))
        out["Avro"].append(frame(2, avro({"ts": r["ts"], "seq": i, "boot_id": "b1", **r["measurements"]})))
        out["Protobuf"].append(frame(3, b"\x00" + Msg(ts=r["ts"], seq=i, boot_id="b1",
                                                       measurements=r["measurements"]).SerializeToString()))
    return {name: ([IngestMessage(topic=f"devices/dev-{i % 2000:05d}/telemetry", payload=p, received_ms=NOW,
                                  source_id=f"s{i}") for i, p in enumerate(ps)],
                   None if name == "plain JSON" else schemas)
            for name, ps in out.items()}


def timings(msgs: list[IngestMessage], one: Callable[[IngestMessage], Any]) -> list[float]:
    for m in msgs[:200]:  # warm (and fill the schema cache)
        one(m)
    gc.disable()
    try:
        out = []
        clock = time.perf_counter_ns
        for m in msgs:
            t = clock()
            one(m)
            out.append((clock() - t) / 1000)
        return out
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="messages per format")
    ap.add_argument("--rounds", type=int, default=3, help="passes; the lowest percentiles are shown")
    args = ap.parse_args()
    print(f"{'format':<12} {'bytes':>5}  {'decode p50':>10} {'p99':>7}  {'route p50':>9} {'p99':>7}   (µs per message)")
    for name, (msgs, schemas) in formats(args.n).items():
        def decode(m: IngestMessage, schemas: WireSchemas | None = schemas) -> Any:
            if schemas is None:
                res = decode_telemetry(m.payload, device_id=m.topic.split("/")[1], topic=m.topic,
                                       received_ms=NOW, now_ms=NOW)
            else:
                res = _decode_with_schema(m, m.topic.split("/")[1], S, NOW, schemas)
            assert len(res.readings) == 1 and not res.rejects, res.rejects

        def routed(m: IngestMessage, schemas: WireSchemas | None = schemas) -> Any:
            _, n, dead = route([m], settings=S, partitions=4, now_ms=NOW, schemas=schemas)
            assert n == 1 and not dead

        ds = [timings(msgs, decode) for _ in range(args.rounds)]
        rs = [timings(msgs, routed) for _ in range(args.rounds)]

        def best(xs: list[list[float]], q: float) -> float:
            return min(percentile(x, q) for x in xs)

        print(f"{name:<12} {len(msgs[0].payload):>5}  {best(ds, 50):>10.1f} {best(ds, 99):>7.1f}  "
              f"{best(rs, 50):>9.1f} {best(rs, 99):>7.1f}")


if __name__ == "__main__":
    main()
