"""Spans of this process collected in memory (the tracer provider is global: set up once, paused between tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fieldmesh.obs import tracing

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    tracing.setup("fieldmesh-test", exporter=_EXPORTER)
    tracing.set_enabled(True)
    _EXPORTER.clear()
    yield _EXPORTER
    tracing.set_enabled(False)  # the other tests of this process run untraced
