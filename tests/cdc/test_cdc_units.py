"""Pure parts of CDC: the envelope codec, the pgoutput decoder on synthetic messages, value mapping."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.bus import load_bus
from fieldmesh.bus.base import TopicSpec
from fieldmesh.bus.nats import PipelinedNatsProducer
from fieldmesh.cdc.base import (
    UNAVAILABLE,
    Change,
    ChangeEvent,
    SourceInfo,
    cdc_topic,
    decode_change_event,
    encode_change_event,
    encode_key,
    event_order,
)
from fieldmesh.cdc.mysql import json_value
from fieldmesh.cdc.pgoutput import PG_EPOCH_US, PgOutputDecoder, converter_for, lsn_from_str, lsn_to_str
from fieldmesh.cdc.postgres import parse_tables
from fieldmesh.cdc.sink import OffsetFile
from fieldmesh.core.errors import BackendError
from fieldmesh.runtime.natsserver import EmbeddedNats


def _c(s: str) -> bytes:
    return s.encode() + b"\0"


def relation(relid: int, cols: list[tuple[str, int, bool]], ident: bytes = b"d") -> bytes:
    out = b"R" + struct.pack(">I", relid) + _c("public") + _c("assets") + ident + struct.pack(">h", len(cols))
    for name, oid, key in cols:
        out += bytes([1 if key else 0]) + _c(name) + struct.pack(">Ii", oid, -1)
    return out


def tup(vals: list[str | bytes | None]) -> bytes:
    out = struct.pack(">h", len(vals))
    for v in vals:
        if v is None:
            out += b"n"
        elif v == b"u":
            out += b"u"
        else:
            e = v.encode() if isinstance(v, str) else v
            out += b"t" + struct.pack(">i", len(e)) + e
    return out


COLS = [("id", 23, True), ("device_id", 25, False), ("vib_max", 701, False)]


def test_decoder_messages_ids_and_schema_change() -> None:
    dec = PgOutputDecoder(db="shop", slot="s1", clock_ms=lambda: 42)
    out: list[Change] = []
    commit_us = 1_000_000  # one second after the PostgreSQL epoch
    assert dec.feed(relation(7, COLS), 0, out) == 0
    dec.feed(b"B" + struct.pack(">qqI", 0xABC, commit_us, 99), 1, out)
    dec.feed(b"I" + struct.pack(">I", 7) + b"N" + tup(["1", "pump-1", "4.5"]), 10, out)
    dec.feed(
        b"U" + struct.pack(">I", 7) + b"K" + tup(["1", None, None]) + b"N" + tup(["1", "pump-1", "5"]),
        11,
        out,
    )
    dec.feed(b"D" + struct.pack(">I", 7) + b"K" + tup(["1", None, None]), 12, out)
    # schema change: a new Relation message, then changes in the new shape
    dec.feed(relation(7, [*COLS, ("site", 25, False)]), 13, out)
    dec.feed(b"I" + struct.pack(">I", 7) + b"N" + tup(["2", "pump-2", "NaN", "north"]), 14, out)
    dec.feed(b"T" + struct.pack(">I", 1) + b"\0" + struct.pack(">I", 7), 15, out)
    assert dec.feed(b"C" + struct.pack(">bqqq", 0, 0xABC, 0xABD, commit_us), 16, out) == 0xABD
    assert dec.schema_changes == 1 and not dec.in_txn
    assert [c.event.op for c in out] == ["c", "u", "d", "c", "t"]
    assert [c.msg_id for c in out] == [f"s1:ABC:{i}" for i in range(5)]
    assert out[0].topic == "fm.cdc.shop.public.assets" and out[0].key == b'{"id":1}'
    assert out[0].event.after == {"id": 1, "device_id": "pump-1", "vib_max": 4.5}
    assert out[1].event.before == {"id": 1, "device_id": None, "vib_max": None}
    assert out[2].event.before == {"id": 1, "device_id": None, "vib_max": None} and out[2].event.after is None
    assert out[3].event.after == {"id": 2, "device_id": "pump-2", "vib_max": "NaN", "site": "north"}
    assert out[4].key is None and out[4].event.before is None and out[4].event.after is None
    s = out[0].event.source
    assert s.ts_ms == (PG_EPOCH_US + commit_us) // 1000 and s.txId == 99 and s.lsn == 10
    assert out[0].event.ts_ms == 42


def test_unchanged_toast_is_filled_from_a_full_old_row() -> None:
    dec = PgOutputDecoder(db="d", slot="s")
    out: list[Change] = []
    dec.feed(relation(1, COLS, ident=b"f"), 0, out)
    dec.feed(b"B" + struct.pack(">qqI", 1, 0, 1), 0, out)
    dec.feed(
        b"U" + struct.pack(">I", 1) + b"O" + tup(["1", "big", "1"]) + b"N" + tup(["1", b"u", "2"]), 1, out
    )
    dec.feed(b"I" + struct.pack(">I", 1) + b"N" + tup(["2", b"u", "2"]), 2, out)
    assert out[0].event.after == {"id": 1, "device_id": "big", "vib_max": 2.0}
    assert out[1].event.after == {"id": 2, "device_id": UNAVAILABLE, "vib_max": 2.0}


def test_change_before_relation_is_an_error() -> None:
    dec = PgOutputDecoder(db="d", slot="s")
    with pytest.raises(ValueError, match="before its Relation message"):
        dec.feed(b"I" + struct.pack(">I", 5) + b"N" + tup(["1"]), 0, [])


@pytest.mark.parametrize(
    ("oid", "text", "value"),
    [
        (16, "t", True),
        (16, "f", False),
        (20, "-9007199254740993", -9007199254740993),
        (700, "Infinity", "Infinity"),
        (701, "1e-05", 1e-05),
        (1700, "123456789012345678901234.5", "123456789012345678901234.5"),
        (1184, "2024-03-01 10:00:00+00", "2024-03-01T10:00:00.000000Z"),
        (1184, "2024-03-01 10:00:00.12+00", "2024-03-01T10:00:00.120000Z"),
        (1184, "2024-03-01 12:00:00+02", "2024-03-01T10:00:00.000000Z"),
        (1184, "infinity", "infinity"),
        (1114, "1970-01-01 00:00:01.5", 1_500_000),
        (1082, "1970-01-10", 9),
        (1082, "5874897-12-31", "5874897-12-31"),
        (1083, "00:00:01.25", 1_250_000),
        (17, "\\xdeadbeef", "3q2+7w=="),
        (1007, "{1,2,3}", "{1,2,3}"),  # int4[]: unmapped, its text form
        (869, "10.0.0.1", "10.0.0.1"),  # inet: unmapped
    ],
)
def test_type_mapping(oid: int, text: str, value: object) -> None:
    assert converter_for(oid)(text) == value


def test_decimal_float_mode_and_mysql_values() -> None:
    import datetime as dt
    from decimal import Decimal

    assert converter_for(1700, decimal_mode="float")("1.25") == 1.25
    assert json_value(Decimal("1.50")) == "1.50" and json_value(Decimal("1.5"), decimal_float=True) == 1.5
    assert json_value(dt.datetime(1970, 1, 1, 0, 0, 1)) == 1_000_000
    assert json_value(dt.datetime(1970, 1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))) == 0
    assert json_value(dt.date(1970, 1, 2)) == 1 and json_value(dt.timedelta(seconds=2)) == 2_000_000
    assert json_value(b"\x01\x02") == "AQI=" and json_value({"b", "a"}) == ["a", "b"]
    assert json.loads(json_value({"a": [1]})) == {"a": [1]}


@given(st.integers(0, 2**64 - 1))
def test_lsn_text_round_trip(lsn: int) -> None:
    assert lsn_from_str(lsn_to_str(lsn)) == lsn


def test_envelope_codec_bare_wrapped_and_tombstone() -> None:
    src = SourceInfo(
        connector="postgresql", db="shop", schema="public", table="assets", ts_ms=5, lsn=9, txId=3
    )
    ev = ChangeEvent(op="u", source=src, ts_ms=6, before={"id": 1}, after={"id": 1, "x": 2})
    raw = encode_change_event(ev)
    doc = json.loads(raw)
    assert set(doc) == {"op", "source", "ts_ms", "before", "after"}
    assert doc["source"] == {
        "connector": "postgresql",
        "db": "shop",
        "table": "assets",
        "ts_ms": 5,
        "name": "fieldmesh",
        "version": "fieldmesh-0.1",
        "schema": "public",
        "snapshot": "false",
        "lsn": 9,
        "txId": 3,
        "server_id": None,
        "gtid": None,
        "file": None,
        "pos": None,
        "row": None,
    }
    assert decode_change_event(raw) == ev
    assert decode_change_event(json.dumps({"schema": {"type": "struct"}, "payload": doc}).encode()) == ev
    assert decode_change_event(b"") is None
    assert decode_change_event(b'{"schema": null, "payload": null}') is None
    with pytest.raises(msgspec.DecodeError):
        decode_change_event(b'{"op": 1}')
    assert event_order(ev) == (5, 9, 0)
    my = ChangeEvent(
        op="c",
        ts_ms=0,
        source=SourceInfo(
            connector="mysql", db="d", table="t", ts_ms=1, file="mariadb-bin.000002", pos=7, row=3
        ),
    )
    assert event_order(my) == (1, (2 << 32) + 7, 3)
    assert encode_key({"b": 2, "a": 1, "c": 3}, ("a", "b")) == b'{"a":1,"b":2}'
    assert cdc_topic("my-db", "public", "as sets") == "fm.cdc.my-db.public.as_sets"
    assert cdc_topic("inv", None, "meters") == "fm.cdc.inv.meters"
    assert parse_tables("public.a, b ,x.y.z") == [("public", "a"), ("public", "b"), ("x.y", "z")]


def test_offset_file_is_replaced_atomically(tmp_path: Path) -> None:
    f = OffsetFile(tmp_path / "sub" / "o.json")
    assert f.load() == {}
    f.save({"file": "a", "pos": 1})
    f.save({"file": "b", "pos": 2})
    assert f.load() == {"file": "b", "pos": 2}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["o.json"]
    f.delete()
    assert f.load() == {}


@pytest.mark.integration
def test_pipelined_producer_acks_dedupes_and_reports_missing_stream(tmp_path: Path) -> None:
    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()

    async def scenario() -> None:
        async with load_bus(srv.url) as bus:
            await bus.ensure_topic(TopicSpec(name="fm.cdc.t", partitions=2))
            prod = PipelinedNatsProducer(bus.nc, max_in_flight=50)  # type: ignore[attr-defined]
            items = [(f"fm.cdc.t.{i % 2}", b"{}", {"Nats-Msg-Id": f"m{i}"}) for i in range(500)]
            await prod.publish(items)
            await prod.publish(items[:100])  # re-sent: acknowledged as duplicates, not stored twice
            info = await bus.stream_info("FM_CDC_T")  # type: ignore[attr-defined]
            assert info.state.messages == 500
            with pytest.raises(BackendError, match="no JetStream stream"):
                await prod.publish([("fm.nowhere.0", b"{}", None)])
            await prod.close()

    try:
        asyncio.run(scenario())
    finally:
        srv.stop()


@pytest.mark.integration
def test_cli_reports_a_missing_database_and_exits(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from fieldmesh.cli.cdc import app as cdc_app

    main = typer.Typer()

    @main.command()
    def other() -> None:  # a second command, as in the real CLI
        pass

    main.add_typer(cdc_app, name="cdc")
    r = CliRunner().invoke(
        main,
        [
            "cdc",
            "--source",
            "postgresql://postgres@127.0.0.1:5432/fm_cdc_no_such_db",
            "--tables",
            "public.t",
            "--bus-url",
            "nats://127.0.0.1:1",
            "--state-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 2
    assert "fm_cdc_no_such_db" in r.output and "does not exist" in r.output
