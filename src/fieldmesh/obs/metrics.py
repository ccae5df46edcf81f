"""Prometheus metrics of every stage, and the one ``/metrics`` that serves them for all processes.

Two kinds of metrics, from two places (docs/observability.md, "Metrics"):

* **Durable counters, from the hot store** (:class:`StoreCollector`): readings received, stored,
  duplicates, late, dead letters by reason, gaps, alerts. The processor commits them with the readings,
  so ``/metrics`` and ``/api/v1/stats`` read the very same numbers, and they survive restarts. Lag per
  stage and partition, the device freshness distribution and the SLO status are computed by the API
  process when scraped.
* **Process metrics of the stages** (the module-level ``GATEWAY_*``, ``PROCESSOR_*``, ``SINK_*``,
  ``*_TO_STORED`` metrics): rates, batch sizes, latency histograms and sink commit times, counted
  where the work happens. ``fieldmesh up`` runs each stage in its own process; every worker gets
  ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode: each process writes its values to
  memory-mapped files in that directory as it counts) and the API process merges the files of all
  processes on each scrape (:func:`multiprocess_collector`). Why this and not workers pushing snapshots
  or each serving its own port: a value is in the file the moment it is counted, so a worker killed
  with ``kill -9`` loses nothing it counted, the files of a dead worker keep counting into the totals
  (a restarted stage never makes a counter go backwards within one ``up``), no extra ports or scrape
  targets exist, and the merge is prometheus-client's own, well-tested code.

Stand-alone roles (``fieldmesh gateway``/``process``) without that variable keep their values in memory.
The edge agent is not part of ``up``: :class:`EdgeCollector` turns its stats into metrics, served by
the agent itself (:func:`serve_edge_metrics`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "CANARY_READINGS", "EVENT_TO_STORED", "GATEWAY_BATCH", "GATEWAY_MESSAGES", "GATEWAY_READINGS", "GATEWAY_REJECTED",
    "GATEWAY_SEND_SECONDS", "LATENCY_BUCKETS", "MULTIPROC_ENV", "MULTIPROC_FILE_BYTES", "PROCESSOR_APPLY_SECONDS",
    "PROCESSOR_BATCHES", "PROCESSOR_BATCH_READINGS", "PROCESSOR_CPU_SECONDS", "PROCESSOR_READINGS",
    "PROCESSOR_SQLITE_CPU_SECONDS", "PROCESSOR_STORE_RETRIES", "RECEIVED_TO_STORED", "SILENCE_BUCKETS",
    "SINK_COMMIT_SECONDS", "AuthCollector", "DoorCollector", "EdgeCollector", "FreshnessCollector", "StoreCollector",
    "alert_metrics", "back_multiproc_files", "count_parts", "freshness", "histogram_buckets", "mark_dead",
    "merged_histogram", "multiprocess_collector", "observe_many", "prepare_multiproc_dir", "serve_edge_metrics",
]

#: The variable that puts prometheus-client in multiprocess mode (read when it is first imported).
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("fieldmesh.metrics")

#: Seconds: from sub-millisecond commits to readings an edge buffer held for hours.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                          900.0, 3600.0, 21600.0, 86400.0, math.inf)
_COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                          math.inf)
_SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, math.inf)
#: Seconds since a device's last reading, the buckets of ``fieldmesh_device_silence_seconds``.
SILENCE_BUCKETS: Final = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 6 * 3600.0, 86400.0,
                          7 * 86400.0, math.inf)

#: Bytes allocated on disk for each of a worker's metric files before prometheus-client maps it (its own
#: initial size is 64 KiB; the processor's histograms used 29,624 bytes in `tests/faults/test_kill9.py`).
MULTIPROC_FILE_BYTES: Final = 256 * 1024


def back_multiproc_files(directory: str | None, pid: int, *, wait_s: float = 1.0) -> list[Path]:
    """Allocate the disk blocks of this process's metric files before prometheus-client maps them.

    prometheus-client sizes a new file with ``truncate`` (a sparse file) and writes to it through ``mmap``; on a
    full disk (a tmpfs, or any file system out of blocks) the first write to a page without a block kills the
    process with SIGBUS, not an error it could handle. With the blocks allocated here no later write of the
    metrics needs the disk. While the disk has no room for them, the worker waits, saying why, before it starts.
    The files are those of the metric kinds the stages use (counters and histograms). A file system that cannot
    allocate (an error other than ENOSPC) is left to prometheus-client as before, with a warning.
    """
    if not directory:
        return []
    out: list[Path] = []
    for kind in ("counter", "histogram"):
        path = Path(directory) / f"{kind}_{pid}.db"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a directory that is not there: prometheus-client says so when it counts
            log.warning("cannot open the metric file %s: %s", path, exc)
            return out
        try:
            size, warn_at = max(os.fstat(fd).st_size, MULTIPROC_FILE_BYTES), 0.0
            while True:
                try:
                    os.posix_fallocate(fd, 0, size)
                    break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        log.warning("cannot allocate the metric file %s (%s): a full disk may kill this process "
                                    "with SIGBUS", path, exc)
                        break
                    if time.monotonic() >= warn_at:  # at once, then every 30 s
                        log.warning("no disk space for the metric file %s (%d KiB): waiting for space before "
                                    "starting", path, size // 1024)
                        warn_at = time.monotonic() + 30
                    time.sleep(wait_s)
        finally:
            os.close(fd)
        out.append(path)
    return out


back_multiproc_files(os.environ.get(MULTIPROC_ENV), os.getpid())

# -- stage metrics (process-local; merged across the processes of ``up``) ------------------------------
GATEWAY_MESSAGES: Final = Counter("fieldmesh_gateway_messages", "MQTT/ingest messages the gateway took and "
                                  "acknowledged", ["source"])
GATEWAY_READINGS: Final = Counter("fieldmesh_gateway_readings", "Readings the gateway put on the bus", ["source"])
GATEWAY_REJECTED: Final = Counter("fieldmesh_gateway_rejected", "Dead letters the gateway sent to the DLQ, "
                                  "by reason", ["reason"])
GATEWAY_BATCH: Final = Histogram("fieldmesh_gateway_batch_messages", "Messages per gateway batch",
                                 buckets=_SIZE_BUCKETS)
GATEWAY_SEND_SECONDS: Final = Histogram("fieldmesh_gateway_send_seconds", "From a batch's bus send to the "
                                        "source's acknowledgement (retries included)", buckets=_COMMIT_BUCKETS)
PROCESSOR_BATCHES: Final = Counter("fieldmesh_processor_batches", "Batches the processor committed")
PROCESSOR_BATCH_READINGS: Final = Histogram("fieldmesh_processor_batch_readings", "Readings decoded per "
                                            "processor batch", buckets=_SIZE_BUCKETS)
PROCESSOR_APPLY_SECONDS: Final = Histogram("fieldmesh_processor_apply_seconds", "Decode, decide and commit of a "
                                           "batch, every sink included", buckets=_COMMIT_BUCKETS)
PROCESSOR_CPU_SECONDS: Final = Counter("fieldmesh_processor_cpu_seconds", "CPU seconds of the processor's apply "
                                      "thread, by part of a batch: decode, decide, alerts, products, store (the "
                                      "hot store's writes and commit), sinks (the other sinks), other", ["part"])
PROCESSOR_SQLITE_CPU_SECONDS: Final = Counter("fieldmesh_processor_sqlite_cpu_seconds", "The processor's store "
                                             "part on the SQLite hot store, split by step of the batch's commit: "
                                             "begin, segments, gaps, rollups, devices, rows, keys, commit, finish",
                                             ["part"])
PROCESSOR_READINGS: Final = Counter("fieldmesh_processor_readings", "What the processor decided per reading "
                                    "(stored, duplicate, late, dead_lettered)", ["outcome"])
CANARY_READINGS: Final = Counter("fieldmesh_canary_readings", "Readings routed to a canary and stored in its "
                                 "table, not the main tables (docs/canary.md)", ["canary"])
PROCESSOR_STORE_RETRIES: Final = Counter("fieldmesh_processor_store_retries", "Batches the store refused and "
                                         "that were tried again")
SINK_COMMIT_SECONDS: Final = Histogram("fieldmesh_sink_commit_seconds", "Commit time per sink: hot (the batch's "
                                       "transaction), alerts (their part of it), lake",
                                       ["sink"], buckets=_COMMIT_BUCKETS)
EVENT_TO_STORED: Final = Histogram("fieldmesh_event_to_stored_seconds", "From a reading's event time (device "
                                   "clock) to the commit that stored it", buckets=LATENCY_BUCKETS)
RECEIVED_TO_STORED: Final = Histogram("fieldmesh_received_to_stored_seconds", "From the gateway's receipt of "
                                      "a reading to the commit that stored it", buckets=LATENCY_BUCKETS)


def count_parts(counters: Mapping[str, Any], seconds: Mapping[str, float]) -> None:
    """Add ``seconds`` by part to ``counters`` (a labelled counter's children by part); parts of 0 are skipped."""
    for part, s in seconds.items():
        if s > 0:
            counters[part].inc(s)


def observe_many(hist: Histogram, values: ArrayLike) -> None:
    """Add many observations to ``hist`` (an unlabelled histogram or a ``.labels()`` child) at once.

    One increment per bucket instead of one ``observe`` per value: a batch of thousands of readings
    costs a ``searchsorted``, which matters on the processor's hot path (and each increment is a write
    to a shared file in multiprocess mode). NaN values are skipped.
    """
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if not arr.size:
        return
    bounds = np.asarray(hist._upper_bounds, dtype=np.float64)
    # bucket i holds values <= bound i and > bound i-1, as Histogram.observe counts them
    counts = np.bincount(np.searchsorted(bounds, arr, side="left"), minlength=len(bounds))
    for i, n in enumerate(counts.tolist()):
        if n:
            hist._buckets[i].inc(n)
    hist._sum.inc(float(arr.sum()))


# -- multiprocess --------------------------------------------------------------------------------------
def prepare_multiproc_dir(path: Path) -> Path:
    """An empty directory for the metric files of one run of ``up`` (the last run's are removed: counters
    start again with the run, as Prometheus expects of a restarted target)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def mark_dead(path: Path, pid: int) -> None:
    """A worker exited: drop its live gauges (its counters and histograms keep counting in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def multiprocess_collector(registry: CollectorRegistry, path: Path) -> Collector:
    """Register on ``registry`` the merge of every process's metric files in ``path``."""
    from prometheus_client import multiprocess

    return multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]


# -- what the API process computes when scraped ---------------------------------------------------------
class _Stats(Protocol):
    received: int
    stored: int
    duplicates: int
    late: int
    unrouted: int
    dead_lettered: Mapping[str, int]
    gaps: int


class StoreCollector(Collector):
    """The hot store's durable counters (the same as ``/api/v1/stats``), lag, alerts and device freshness.

    ``store`` is a :class:`~fieldmesh.store.base.HotStore`; ``lag_cache`` and ``partition_cache`` hold
    the lag per stage and per stage and partition, refreshed by the caller before each scrape.
    """

    def __init__(self, store: Any, lag_cache: Mapping[str, int], partition_cache: Mapping[str, Mapping[int, int]],
                 alerts: Callable[[], Any] | None = None, *, reasons: Sequence[str] = (),
                 retention: Callable[[Any], dict[str, dict[str, Any]] | None] | None = None) -> None:
        self.store = store
        self.retention = retention
        self.alerts = alerts
        self.lag_cache = lag_cache
        self.partition_cache = partition_cache
        self.reasons = tuple(reasons)

    def collect(self) -> Iterator[Any]:
        st: _Stats = self.store.stats()
        for name, value, help_ in (
            ("fieldmesh_readings_received", st.received, "Readings and payloads that reached the pipeline"),
            ("fieldmesh_readings_stored", st.stored, "Readings stored (first arrival of each identity)"),
            ("fieldmesh_readings_duplicates", st.duplicates, "Readings dropped as duplicates of a stored one"),
            ("fieldmesh_readings_late", st.late, "Stored readings whose window had already been emitted"),
            ("fieldmesh_messages_unrouted", st.unrouted, "Messages on topics nothing serves (DLQ unknown_topic)"),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], value)
            yield c
        dl = CounterMetricFamily("fieldmesh_dead_letters", "Rejected items by reason", labels=["reason"])
        for reason in sorted(set(self.reasons) | set(st.dead_lettered)):
            dl.add_metric([reason], st.dead_lettered.get(reason, 0))
        yield dl
        # a gauge: it falls when late readings fill a gap
        gaps = GaugeMetricFamily("fieldmesh_seq_gaps", "Seqs missing between readings stored, per device and boot")
        gaps.add_metric([], st.gaps)
        yield gaps
        lag = GaugeMetricFamily("fieldmesh_bus_lag_messages", "Messages not yet consumed", labels=["stage"])
        for stage, n in self.lag_cache.items():
            lag.add_metric([stage], n)
        yield lag
        plag = GaugeMetricFamily("fieldmesh_bus_partition_lag_messages", "Messages not yet consumed per partition",
                                 labels=["stage", "partition"])
        for stage, parts in self.partition_cache.items():
            for p, n in sorted(parts.items()):
                plag.add_metric([stage, str(p)], n)
        yield plag
        if self.alerts is not None:
            yield from alert_metrics(self.alerts().stats())
        if self.retention is not None and (retention := self.retention(self.store)):
            deleted = CounterMetricFamily("fieldmesh_retention_deleted_rows", "Rows retention deleted from the hot "
                                          "store (the lake holds them)", labels=["tier"])
            held = GaugeMetricFamily("fieldmesh_retention_held_rows", "Rows past retention kept at the last prune: "
                                     "the lake does not hold them yet", labels=["tier"])
            for tier, row in retention.items():
                deleted.add_metric([tier], row["deleted"])
                held.add_metric([tier], row["held"])
            yield deleted
            yield held
        summary = self.store.device_summary()
        last = summary.last_seen_ms
        g = GaugeMetricFamily("fieldmesh_devices", "Devices seen")
        g.add_metric([], summary.devices)
        yield g
        if last:
            f = GaugeMetricFamily("fieldmesh_freshness_seconds", "Seconds since the newest stored reading arrived")
            f.add_metric([], max(0.0, time.time() - last / 1000))
            yield f


def alert_metrics(st: Mapping[str, Any]) -> Iterator[Any]:
    """The alert tables' stats (:meth:`~fieldmesh.store.alerts.AlertTables.stats`) as metrics."""
    from fieldmesh.stream.alerts import SEVERITIES

    active = GaugeMetricFamily("fieldmesh_alerts_active", "Alerts open or acknowledged", labels=["severity"])
    for sev in SEVERITIES:
        active.add_metric([sev], st["active_by_severity"].get(sev, 0))
    yield active
    notes = GaugeMetricFamily("fieldmesh_alert_notifications", "Notifications in the outbox by status",
                              labels=["status"])
    for status, n in st["notifications"].items():
        notes.add_metric([status], n)
    yield notes
    tries = CounterMetricFamily("fieldmesh_alert_notification_failed_tries", "Failed tries of notifications")
    tries.add_metric([], st["failed_tries"])
    yield tries
    refused = CounterMetricFamily("fieldmesh_alert_rules_file_refused",
                                  "Changed versions of the rules file refused (the rules in force kept)")
    refused.add_metric([], st.get("rules_file_refused", 0))
    yield refused
    lat = GaugeMetricFamily("fieldmesh_alert_notification_latency_seconds",
                            "From an alert step's commit to its receiver's acknowledgement, last 1000 delivered",
                            labels=["quantile"])
    for name, q in (("p50", "0.5"), ("p99", "0.99")):
        if st["latency_ms"][name] is not None:
            lat.add_metric([q], st["latency_ms"][name] / 1000)
    yield lat


def freshness(last_seen_ms: Mapping[str, int], now_ms: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Seconds since each device's last reading was received (wall clock), one value per device."""
    if not last_seen_ms:
        return np.empty(0, dtype=np.float64)
    last = np.fromiter(last_seen_ms.values(), dtype=np.float64, count=len(last_seen_ms))
    return np.maximum(0.0, (now_ms - last) / 1000.0)


#: The quantiles of device silence exported as ``fieldmesh_device_silence_quantile_seconds``.
_SILENCE_QUANTILES: Final = (0.5, 0.9, 0.99, 1.0)


class FreshnessCollector(Collector):
    """Per-device freshness as a distribution: how many devices have been silent up to each bucket's
    seconds (``fieldmesh_device_silence_seconds``, a gauge histogram, so ``histogram_quantile`` works on
    it), and its exact quantiles across devices (``fieldmesh_device_silence_quantile_seconds``).

    ``last_seen`` gives device -> wall-clock ms of its last reading (the store's ``last_seen``); it is
    read at most every ``cache_s`` seconds (one query over every device).
    """

    def __init__(self, last_seen: Callable[[], Mapping[str, int]], *, cache_s: float = 2.0) -> None:
        self.last_seen = last_seen
        self.cache_s = cache_s
        self._at = -math.inf
        self._values: dict[str, int] = {}

    def silence(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        """Seconds of silence per device, now."""
        if time.monotonic() - self._at >= self.cache_s:
            self._values = dict(self.last_seen())
            self._at = time.monotonic()
        return freshness(self._values, int(time.time() * 1000))

    def collect(self) -> Iterator[Any]:
        s = self.silence()
        cumulative = np.searchsorted(np.sort(s), np.asarray(SILENCE_BUCKETS), side="right")
        buckets = [("+Inf" if math.isinf(b) else repr(b), float(n)) for b, n in zip(SILENCE_BUCKETS, cumulative,
                                                                                     strict=True)]
        h = GaugeHistogramMetricFamily("fieldmesh_device_silence_seconds",
                                       "Devices by seconds since their last reading was received",
                                       buckets=buckets, gsum_value=float(s.sum()))
        yield h
        q = GaugeMetricFamily("fieldmesh_device_silence_quantile_seconds",
                              "Seconds since the last reading, quantiles across devices (1: the most silent)",
                              labels=["quantile"])
        if s.size:
            for p in _SILENCE_QUANTILES:
                q.add_metric([repr(p)], float(np.quantile(s, p, method="inverted_cdf")))
        yield q


class AuthCollector(Collector):
    """API requests refused, by reason (``failures`` gives reason -> count)."""

    def __init__(self, failures: Callable[[], Mapping[str, int]]) -> None:
        self.failures = failures

    def collect(self) -> Iterator[Any]:
        c = CounterMetricFamily("fieldmesh_auth_failures", "API requests refused (401, 403) by reason",
                                labels=["reason"])
        for reason, n in sorted(self.failures().items()):
            c.add_metric([reason], n)
        yield c


class DoorCollector(Collector):
    """What the MQTT door refused, from its log (``counts`` gives reason -> count)."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Any]:
        c = CounterMetricFamily("fieldmesh_door_refused", "What the MQTT door refused, from its log, by reason",
                                labels=["reason"])
        for reason, n in sorted(self.counts().items()):
            c.add_metric([reason], n)
        yield c


# -- the edge agent -------------------------------------------------------------------------------------
class EdgeCollector(Collector):
    """The edge agent's stats (:meth:`~fieldmesh.edge.agent.EdgeAgent.stats`) as metrics: buffer depth,
    egress bytes, readings sent and acknowledged, drops, uplink state."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        st = self.stats()
        buf, up = st.get("buffer", {}), st.get("uplink", {})
        for name, value, help_ in (
            ("fieldmesh_edge_buffer_pending_readings", buf.get("pending_readings", 0),
             "Readings in the edge buffer not yet acknowledged by the broker"),
            ("fieldmesh_edge_buffer_bytes", buf.get("size_bytes", 0), "Bytes the edge buffer holds on disk"),
            ("fieldmesh_edge_uplink_connected", 1 if up.get("state") == "connected" else 0,
             "1 while the uplink is connected"),
            ("fieldmesh_edge_devices", st.get("devices", 0), "Devices the agent reads"),
        ):
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], float(value))
            yield g
        for name, value, help_ in (
            ("fieldmesh_edge_egress_bytes", up.get("bytes_wire", 0), "Bytes sent on the uplink (MQTT framing "
             "included)"),
            ("fieldmesh_edge_egress_payload_bytes", up.get("bytes_payload", 0), "Payload bytes sent on the uplink"),
            ("fieldmesh_edge_messages_sent", up.get("messages", 0), "MQTT messages published"),
            ("fieldmesh_edge_readings_sent", up.get("readings_sent", 0), "Readings published (resends included)"),
            ("fieldmesh_edge_readings_acked", up.get("readings_acked", 0), "Readings the broker acknowledged"),
            ("fieldmesh_edge_buffer_dropped_readings", buf.get("dropped_readings", 0),
             "Readings the full buffer dropped (its full policy)"),
            ("fieldmesh_edge_uplink_disconnects", up.get("disconnects", 0), "Uplink disconnections"),
            ("fieldmesh_edge_anomalies", st.get("anomalies", 0), "Readings the edge model judged anomalous"),
            ("fieldmesh_edge_source_errors", st.get("source_errors", 0), "Errors reading the sources"),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], float(value))
            yield c


def serve_edge_metrics(stats: Callable[[], Mapping[str, Any]], *, port: int, host: str = "127.0.0.1") -> Any:
    """Serve the edge agent's metrics on ``http://host:port/metrics`` (a daemon thread); the server."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(EdgeCollector(stats))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def histogram_buckets(registry: Any, name: str) -> tuple[list[float], list[float]] | None:
    """(upper bounds, cumulative counts) of histogram ``name`` in ``registry`` (a CollectorRegistry), its
    label sets summed; None when it has no samples."""
    by_le: dict[float, float] = {}
    for fam in registry.collect():
        if fam.name != name:
            continue
        for s in fam.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                by_le[le] = by_le.get(le, 0.0) + s.value
    if not by_le:
        return None
    bounds = sorted(by_le)
    return bounds, [by_le[b] for b in bounds]


def merged_histogram(path: Path, name: str) -> tuple[list[float], list[float]] | None:
    """:func:`histogram_buckets` of ``name`` merged across the processes writing to ``path``."""
    registry = CollectorRegistry()
    multiprocess_collector(registry, path)
    return histogram_buckets(registry, name)


def multiproc_dir_from_env() -> Path | None:
    """The multiprocess directory this process writes to, if any."""
    v = os.environ.get(MULTIPROC_ENV)
    return Path(v) if v else None
