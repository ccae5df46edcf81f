"""Tracing and log pieces without servers: the buffer record keeps its trace context, setup follows the
OTEL_* variables, batch spans link, JSON log lines carry trace and span ids."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from fieldmesh.edge.buffer import DiskBuffer
from fieldmesh.edge.frame import WireReading
from fieldmesh.edge.uplink import decode_record, decode_record_traced, encode_record
from fieldmesh.obs import logs, tracing
from fmtest.otlp import memory_spans

GROUPS = [("pump-1", [WireReading(ts=1_763_812_345_123, measurements={"t": 1.5}, seq=3, boot_id="b")])]
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    yield from memory_spans()


def test_buffer_records_keep_their_trace_context_across_a_reopen(tmp_path) -> None:
    buf = DiskBuffer(path=tmp_path / "buf")
    buf.append(encode_record(GROUPS), 1)  # as written before records had trace context
    buf.append(encode_record(GROUPS, TP, "fm=1"), 1)
    buf.close()
    again = DiskBuffer(path=tmp_path / "buf")  # another process after a crash: the records come back
    old, new = again.read()
    assert decode_record_traced(old.payload) == (GROUPS, None, None)
    assert decode_record_traced(new.payload) == (GROUPS, TP, "fm=1")
    assert decode_record(new.payload) == GROUPS == decode_record(old.payload)
    # without trace context the record is byte for byte the old format
    assert encode_record(GROUPS) == msgspec.msgpack.encode(GROUPS)


def _setup_in_child(env: dict[str, str]) -> str:
    code = "from fieldmesh.obs import tracing; print(tracing.setup('x'), tracing.enabled())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_setup_follows_the_standard_variables() -> None:
    assert _setup_in_child({}) == "False False"  # no endpoint: nothing traced, nothing exported
    assert _setup_in_child({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) == "True True"
    assert _setup_in_child({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}) == "True True"
    assert _setup_in_child({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}) \
        == "False False"
    assert _setup_in_child({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}) \
        == "False False"


def test_off_means_no_context_at_all() -> None:
    if tracing.enabled():
        pytest.fail("tracing must be off outside the spans fixture")
    assert tracing.current_traceparent() is None
    assert tracing.headers_of_current() == {}
    assert tracing.current_context() is None


def test_batch_span_is_a_child_of_the_first_context_and_links_the_rest(spans: InMemorySpanExporter) -> None:
    a, b = tracing.context_of(TP), tracing.context_of("00-11111111111111111111111111111111-2222222222222222-01")
    assert tracing.context_of("00-zz-bad-01") is None and tracing.context_of(None) is None
    with tracing.batch_span("t", "work", [None, a, a, b]):
        pass
    with tracing.batch_span("t", "root", []):
        pass
    work, root = spans.get_finished_spans()
    assert work.parent is not None and work.parent.span_id == a.span_id and work.context.trace_id == a.trace_id
    assert [ln.context.span_id for ln in work.links] == [b.span_id]
    assert work.attributes["fieldmesh.linked_traces"] == 1
    assert root.parent is None


def test_sampler_ratio_from_the_environment_keeps_about_that_share() -> None:
    code = ("from fieldmesh.obs import tracing; tracing.setup('x')\n"
            "n = 0\n"
            "for _ in range(20000):\n"
            "    with tracing.batch_span('t', 's', []) as s:\n"
            "        n += s.get_span_context().trace_flags.sampled\n"
            "print(n)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env = {**clean, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01",
           "OTEL_BSP_EXPORT_TIMEOUT": "100", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert 120 <= int(out.stdout.strip()) <= 280, out.stderr[-2000:]  # 200 expected; 7 sigma either side


def test_json_log_lines_carry_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("processor"))
    log = logging.getLogger("fieldmesh.test.jsonlogs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("outside")
        with tracing.span("t", "inside") as s:
            log.warning("inside %d", 7)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    outside, inside, failed = (json.loads(ln) for ln in stream.getvalue().splitlines())
    assert "trace_id" not in outside and outside["msg"] == "outside" and outside["role"] == "processor"
    sc = s.get_span_context()
    assert inside["trace_id"] == f"{sc.trace_id:032x}" and inside["span_id"] == f"{sc.span_id:016x}"
    assert inside["msg"] == "inside 7" and inside["level"] == "WARNING" and inside["ts"].endswith("Z")
    assert "ValueError: boom" in failed["exc"]


def test_log_json_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from fieldmesh.cli.main import app

    monkeypatch.setenv(logs.ENV_JSON, "0")  # restored after the test (the flag sets it for this process)
    assert not logs.json_logs_wanted()
    assert CliRunner().invoke(app, ["--log-json", "version"]).exit_code == 0
    assert logs.json_logs_wanted()  # the processes 'up' starts inherit it
    code = ("import logging; from fieldmesh.obs import logs; logs.setup_logging('gateway'); "
            "logging.getLogger('fieldmesh.x').info('hello')")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, logs.ENV_JSON: "1"}, capture_output=True,
                         text=True, timeout=60, check=True)
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert line["msg"] == "hello" and line["role"] == "gateway" and line["logger"] == "fieldmesh.x"
