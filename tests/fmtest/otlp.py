"""An OTLP/HTTP trace receiver inside the test: decodes ``ExportTraceServiceRequest`` (opentelemetry-proto)."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    links: tuple[tuple[str, str], ...]
    attributes: dict[str, Any] = field(hash=False, compare=False)
    start_ns: int = 0
    end_ns: int = 0


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """``POST /v1/traces`` on a free loopback port; :attr:`spans` holds every span received."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, req: ExportTraceServiceRequest) -> None:
        got = []
        for rs in req.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                        name=s.name, service=service,
                        links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    ))
        with self._lock:
            self.requests += 1
            self.spans.extend(got)

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def named(self, name: str) -> list[Span]:
        return [s for s in self.snapshot() if s.name == name]

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.snapshot() if s.trace_id == trace_id]

    def wait(self, cond: Callable[[list[Span]], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            v = cond(self.snapshot())
            if v:
                return v
            time.sleep(0.1)
        names: dict[str, int] = {}
        for s in self.snapshot():
            names[f"{s.service}/{s.name}"] = names.get(f"{s.service}/{s.name}", 0) + 1
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; spans received: {names}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def env(endpoint: str, **extra: str) -> dict[str, str]:
    """The OTEL_* variables that send a process's traces to ``endpoint`` quickly."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        **extra,
    }


def connected(spans: list[Span]) -> bool:
    """Every span but one (the root) has its parent among ``spans``."""
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id or s.parent_span_id not in ids]
    return len(roots) == 1


def reached(ctx: tuple[str, str], spans: list[Span], name: str) -> bool:
    """A span named ``name`` is a child of the span ``ctx`` (trace id, span id), or links to it."""
    tid, sid = ctx
    return any(s.name == name and ((s.trace_id == tid and s.parent_span_id == sid) or ctx in s.links)
               for s in spans)


_MEMORY: list[Any] = []


def memory_spans() -> Iterator[Any]:
    """Body of a ``spans`` fixture: this process's spans in an in-memory exporter. The tracer provider is
    global, so it is set up once; tracing is on during the test and paused after it."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from fieldmesh.obs import tracing

    if not _MEMORY:
        _MEMORY.append(InMemorySpanExporter())
    exporter = _MEMORY[0]
    tracing.setup("fieldmesh-test", exporter=exporter)
    tracing.set_enabled(True)
    exporter.clear()
    yield exporter
    tracing.set_enabled(False)  # the other tests of this process run untraced
