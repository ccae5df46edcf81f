"""Traces with OpenTelemetry: one trace from the edge read to every sink commit (docs/observability.md).

Tracing is on in a process only when :func:`setup` found an OTLP endpoint in the standard variables
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and the OpenTelemetry SDK is
installed (``pip install fieldmesh[otel]``). Otherwise :func:`enabled` is False and every stage skips its
tracing code at a single check per batch: no span, no header, no per-reading work.

Everything else follows OpenTelemetry's own variables: the exporter (OTLP over HTTP/protobuf) reads
``OTEL_EXPORTER_OTLP_*`` (headers, timeout, certificate), the sampler ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``; ``parentbased_traceidratio`` with
``0.01`` keeps 1% of the traces, decided once where a trace starts), the batch processor
``OTEL_BSP_*``, the resource ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME``.
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn tracing off.

Context travels as W3C trace context (``traceparent``, ``tracestate``): MQTT 5 user properties, a
reading's ``meta.traceparent`` on MQTT 3.1.1, NATS and Kafka headers on the bus. Where one unit of work
carries many (a bus record of readings from many messages, a lake commit of many batches), its span is a
child of the first context and links to the others (:func:`batch_span`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

__all__ = [
    "MAX_LINKS",
    "batch_span",
    "context_of",
    "current_context",
    "current_traceparent",
    "enabled",
    "headers_of",
    "headers_of_current",
    "set_enabled",
    "setup",
    "shutdown",
    "span",
    "start_batch_span",
    "traceparent_of",
]

log = logging.getLogger(__name__)

#: Links one span keeps at most (OpenTelemetry's default span limit is 128).
MAX_LINKS: Final = 64

#: version, trace id, span id, flags; a future version may append fields after a dash
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")

_state: dict[str, Any] = {"enabled": False, "provider": None, "service": None}


def enabled() -> bool:
    """Whether this process records and exports traces (:func:`setup` found an endpoint)."""
    return bool(_state["enabled"])


def _endpoint() -> str | None:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return None
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def setup(service: str, *, exporter: Any = None) -> bool:
    """Turn tracing on for this process when an OTLP endpoint is configured; returns :func:`enabled`.

    ``service`` is the ``service.name`` of this process's spans unless ``OTEL_SERVICE_NAME`` names
    another. ``exporter`` (an OpenTelemetry ``SpanExporter``, e.g. in-memory in tests) turns tracing on
    without an endpoint, exporting each span as it ends. Idempotent: a second call keeps the first provider.
    """
    if _state["provider"] is not None:
        return enabled()
    endpoint = _endpoint() if exporter is None else "(given exporter)"
    if endpoint is None:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_*ENDPOINT is set but the OpenTelemetry SDK is not installed: "
                    "no traces (pip install 'fieldmesh[otel]')")
        return False
    attrs = {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service}
    # the sampler comes from OTEL_TRACES_SAMPLER(_ARG); the exporter from OTEL_EXPORTER_OTLP_*
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()) if exporter is None
                                else SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _state.update(enabled=True, provider=provider, service=attrs[SERVICE_NAME])
    log.info("tracing: exporting to %s as %s (sampler %s)", endpoint, attrs[SERVICE_NAME],
             os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"))
    return True


def set_enabled(on: bool) -> None:
    """Pause (False) or resume (True) tracing after :func:`setup` turned it on (tests, benchmarks)."""
    _state["enabled"] = bool(on) and _state["provider"] is not None


def shutdown() -> None:
    """Export what is pending and stop (also done at interpreter exit)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()
        _state.update(enabled=False)


def _tracer(name: str) -> Any:
    from opentelemetry import trace

    return trace.get_tracer(name)


def context_of(traceparent: str | None, tracestate: str | None = None) -> Any:
    """The remote span context a W3C ``traceparent`` (and ``tracestate``) names; None when absent or invalid."""
    if not traceparent:
        return None
    m = _TRACEPARENT.fullmatch(traceparent)
    if m is None or m[1] == "ff" or (m[1] == "00" and m[5]):
        return None
    trace_id, span_id = int(m[2], 16), int(m[3], 16)
    if not trace_id or not span_id:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState

    state = TraceState.from_header([tracestate]) if tracestate else None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(m[4], 16)), trace_state=state)


def traceparent_of(sc: Any) -> str:
    """The W3C ``traceparent`` of a span context."""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def current_context() -> Any:
    """The span context of the current span (None outside of one, or when tracing is off)."""
    if not enabled():
        return None
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    return sc if sc.is_valid else None


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span (None outside of one, or when tracing is off)."""
    if not enabled():
        return None
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    return traceparent_of(sc) if sc.is_valid else None


def headers_of_current() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span, as headers; empty outside of one."""
    if not enabled():
        return {}
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return {}
    out = {"traceparent": traceparent_of(sc)}
    if sc.trace_state:
        out["tracestate"] = sc.trace_state.to_header()
    return out


@contextmanager
def span(scope: str, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A child of the current span (a root where there is none), current while the block runs."""
    with _tracer(scope).start_as_current_span(name, attributes=attributes) as s:
        yield s


def headers_of(s: Any) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of a span, as headers."""
    sc = s.get_span_context()
    if not sc.is_valid:
        return {}
    out = {"traceparent": traceparent_of(sc)}
    if sc.trace_state:
        out["tracestate"] = sc.trace_state.to_header()
    return out


def start_batch_span(
    scope: str,
    name: str,
    parents: Iterable[Any],
    attributes: Mapping[str, Any] | None = None,
    start_time_ns: int | None = None,
) -> Any:
    """Start (not make current) a span for work that carries many traces' items: a child of the first
    span context of ``parents`` (None entries skipped), linked to the other distinct ones (at most
    :data:`MAX_LINKS`); a root span, subject to the sampler, when there is none. The caller ends it.

    ``parents`` is consumed lazily: past the first context, only when the span records (is sampled), so
    a generator that parses ``traceparent`` strings costs one parse per unsampled span."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    it = iter(parents)
    first = next((sc for sc in it if sc is not None), None)
    # no first context: a root, whatever span is current
    ctx = trace.set_span_in_context(trace.NonRecordingSpan(first) if first is not None else trace.INVALID_SPAN,
                                    otel_context.Context())
    s = _tracer(scope).start_span(name, context=ctx, attributes=attributes, start_time=start_time_ns)
    if first is not None and s.is_recording():
        seen = {(first.trace_id, first.span_id)}
        for sc in it:
            if sc is None or (k := (sc.trace_id, sc.span_id)) in seen:
                continue
            seen.add(k)
            if len(seen) <= MAX_LINKS + 1:
                s.add_link(sc)
        if len(seen) > 1:
            s.set_attribute("fieldmesh.linked_traces", len(seen) - 1)
    return s


@contextmanager
def batch_span(
    scope: str,
    name: str,
    parents: Iterable[Any],
    attributes: Mapping[str, Any] | None = None,
    start_time_ns: int | None = None,
) -> Iterator[Any]:
    """:func:`start_batch_span`, current while the block runs and ended after it."""
    from opentelemetry import trace

    s = start_batch_span(scope, name, parents, attributes, start_time_ns)
    with trace.use_span(s, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        yield s
