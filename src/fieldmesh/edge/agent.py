"""The edge agent: sources -> clean -> score -> reduce -> buffer -> uplink, plus the twin.

Acknowledgements, in order: a source batch is acknowledged to its source (the simulator's saved
position, the local broker's PUBACK, ...) only after its readings are appended to the buffer and,
with ``buffer.fsync: always``, fsynced. A buffer record is advanced (and its segment deleted once
all of it is) only after every MQTT message carrying its readings has its PUBACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.buffer import BufferFull, DiskBuffer
from fieldmesh.edge.config import EdgeConfig, SourceConfig
from fieldmesh.edge.contract import ReadingContract, register_schema
from fieldmesh.edge.frame import DeviceIndex, Frame, WireReading, occurrence_groups
from fieldmesh.edge.infer import make_scorer
from fieldmesh.edge.jobs import JobClient, attach_jobs
from fieldmesh.edge.preprocess import Aggregate, Preprocessor
from fieldmesh.edge.sources.base import Source, SourceBatch
from fieldmesh.edge.twin import Twin
from fieldmesh.edge.uplink import Uplink, encode_record
from fieldmesh.obs import tracing

__all__ = ["EdgeAgent", "Pipeline", "make_source"]

log = logging.getLogger("fieldmesh.edge")
_json = msgspec.json.Encoder()

Groups = list[tuple[str, list[WireReading]]]


def make_source(sc: SourceConfig, index: int, state_dir: Path) -> Source:
    """Build the source plugin a config entry names (heavy protocol libraries load lazily)."""
    kind = sc.kind
    if kind == "simulator":
        from fieldmesh.edge.sources.simulator import SimulatorSource

        assert sc.simulator is not None
        return SimulatorSource(
            sc.simulator,
            state_path=state_dir / f"source{index}-simulator.json",
            name=f"sources[{index}].simulator",
        )
    if kind == "modbus":
        from fieldmesh.edge.sources.modbus import ModbusSource

        assert sc.modbus is not None
        return ModbusSource(sc.modbus, name=f"sources[{index}].modbus")
    if kind == "opcua":
        from fieldmesh.edge.sources.opcua import OpcuaSource

        assert sc.opcua is not None
        return OpcuaSource(sc.opcua, name=f"sources[{index}].opcua")
    from fieldmesh.edge.sources.mqtt import MqttSource

    assert sc.mqtt is not None
    return MqttSource(sc.mqtt, name=f"sources[{index}].mqtt")


def _fields(r: WireReading) -> dict[str, Any]:
    return {"ts": r.ts, "measurements": r.measurements, "seq": r.seq, "boot_id": r.boot_id, "meta": r.meta,
            "event_id": r.event_id}


class Pipeline:
    """The synchronous core of the agent: a source batch in, a buffer record out (no I/O).

    Args:
        cfg: the agent config (preprocess and infer sections are used).
        boot_id: stamped on readings whose source has no identity of its own.
    """

    def __init__(self, cfg: EdgeConfig, *, boot_id: str) -> None:
        self.devices = DeviceIndex()
        self.pre = Preprocessor(cfg.preprocess, self.devices)
        self.scorer = make_scorer(cfg.infer)
        self.default_threshold = (
            cfg.infer.threshold if cfg.infer.threshold is not None else self.scorer.default_threshold
        )
        self.boot_id = boot_id
        self._next_seq = np.zeros(64, dtype=np.int64)
        self.anomalies = 0
        #: The reading contract (``schema:`` in the config); set by the agent, which owns its files.
        self.contract: ReadingContract | None = None

    def _assign_seq(self, dev: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        need = int(dev.max()) + 1
        if need > self._next_seq.shape[0]:
            grown = np.zeros(max(need, 2 * self._next_seq.shape[0]), dtype=np.int64)
            grown[: self._next_seq.shape[0]] = self._next_seq
            self._next_seq = grown
        seq = np.empty(dev.shape[0], dtype=np.int64)
        for g in occurrence_groups(dev):
            d = dev[g]
            seq[g] = self._next_seq[d]
            self._next_seq[d] += 1
        return seq

    def process(self, batch: SourceBatch) -> tuple[Groups, int, list[tuple[str, WireReading]]]:
        """Run one batch through the chain: ``(record groups, readings, anomalies)``."""
        if len(batch) == 0:
            return [], 0, []
        dev = self.devices.indices(batch.device_ids)
        boot_ids = None
        if batch.seq is None:
            seq = self._assign_seq(dev)
        else:
            seq = np.array(batch.seq, dtype=np.int64)
            missing = seq < 0
            if batch.boot_ids is not None:
                default = batch.boot_id or self.boot_id
                boot_ids = np.array(
                    [default if m else b for b, m in zip(batch.boot_ids, missing.tolist(), strict=True)],
                    dtype=object,
                )
            if missing.any():
                seq[missing] = self._assign_seq(dev[missing])
        frame = Frame(
            dev=dev,
            ts_ms=np.asarray(batch.ts_ms, dtype=np.int64),
            seq=seq,
            cols={k: np.array(v, dtype=np.float64) for k, v in batch.cols.items()},
            boot_id=batch.boot_id or self.boot_id,
            boot_ids=boot_ids,
        )
        frame = self.pre.clean(frame)
        if len(frame):
            score = self.scorer.score(frame)
            thr = self.pre.threshold[frame.dev]
            thr = np.where(np.isnan(thr), self.default_threshold, thr)
            frame.score = score
            frame.anomaly = score >= thr
        out, aggs = self.pre.reduce(frame)
        return self.to_wire(out, aggs)

    def to_wire(
        self, frame: Frame, aggs: list[Aggregate]
    ) -> tuple[Groups, int, list[tuple[str, WireReading]]]:
        """Readings grouped per device (per-device order kept) and the anomalies among them."""
        ids = self.devices.ids
        per: dict[int, list[WireReading]] = {}
        anomalies: list[tuple[str, WireReading]] = []
        n = len(frame)
        refused = 0
        contract = self.contract
        if n:
            names = list(frame.cols)
            cols = [frame.cols[k].tolist() for k in names]
            devs = frame.dev.tolist()
            tss = frame.ts_ms.tolist()
            seqs = frame.seq.tolist()
            scores = frame.score.round(3).tolist() if frame.score is not None else None
            flags = frame.anomaly.tolist() if frame.anomaly is not None else None
            boot = frame.boot_id
            boots = frame.boot_ids.tolist() if frame.boot_ids is not None else None
            for i, row in enumerate(zip(*cols, strict=True)):
                meas = {k: v for k, v in zip(names, row, strict=True) if v == v}
                meta = None
                if scores is not None:
                    is_an = flags is not None and flags[i]
                    meta = {"anomaly_score": scores[i], "decision": "anomaly" if is_an else "normal"}
                r = WireReading(
                    ts=tss[i],
                    measurements=meas,
                    seq=seqs[i],
                    boot_id=boot if boots is None else boots[i],
                    meta=meta,
                )
                d = devs[i]
                if contract is not None and not contract.check(ids[d], _fields(r)):
                    refused += 1
                    continue
                lst = per.get(d)
                if lst is None:
                    per[d] = [r]
                else:
                    lst.append(r)
                if meta is not None and meta["decision"] == "anomaly":
                    anomalies.append((ids[d], r))
        for d, r in aggs:
            if contract is not None and not contract.check(ids[d], _fields(r)):
                refused += 1
                continue
            per.setdefault(d, []).append(r)
        self.anomalies += len(anomalies)
        return [(ids[d], lst) for d, lst in per.items()], n + len(aggs) - refused, anomalies


class EdgeAgent:
    """The edge agent process.

    Args:
        cfg: the validated config.
        sources: source plugins to use instead of building them from ``cfg.sources`` (tests, bench).
    """

    def __init__(self, cfg: EdgeConfig, *, sources: list[Source] | None = None) -> None:
        self.cfg = cfg
        self.boot_id = cfg.agent.boot_id or f"b{int(time.time())}{secrets.token_hex(2)}"
        b = cfg.buffer
        try:
            self.buffer = DiskBuffer(
                path=b.path,
                max_bytes=b.max_bytes,
                segment_bytes=b.segment_bytes,
                full_policy=b.full_policy,
                fsync=b.fsync,
                fsync_interval_ms=b.fsync_interval_ms,
            )
        except OSError as exc:
            raise ConfigError(f"buffer.path: cannot use {b.path}: {exc}", key="buffer.path") from exc
        self.state_dir = Path(b.path) / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = Pipeline(cfg, boot_id=self.boot_id)
        if cfg.schema_ is not None:
            self.pipeline.contract = ReadingContract.from_file(
                cfg.schema_.file, rejects_path=self.state_dir / "rejects.jsonl")
        self.sources: list[Source] = (
            sources
            if sources is not None
            else [make_source(sc, i, self.state_dir) for i, sc in enumerate(cfg.sources)]
        )
        # The window checkpoint holds the open windows and, in the same atomic file, the position
        # of every replayable source: a restart resumes both from one consistent point.
        self._windows_path = self.state_dir / "windows.msgpack"
        self._positions: dict[str, Any] = {}
        if self._windows_path.exists():
            try:
                ck = msgspec.msgpack.decode(self._windows_path.read_bytes())
                restored = self.pipeline.pre.load_window_state(ck["windows"])
                self._positions = dict(ck.get("sources", {}))
                for src in self.sources:
                    restore = getattr(src, "restore", None)
                    if restore is not None and src.name in self._positions:
                        restore(self._positions[src.name])
                log.info("restored the open windows of %d device(s)", restored)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable window state %s: %s", self._windows_path, exc)
        self.uplink = Uplink(cfg.uplink, self.buffer)
        self.twin: Twin | None = None
        if cfg.twin.enabled:
            self.twin = Twin(
                self.pipeline.pre,
                self.pipeline.devices,
                publish=lambda t, p, r: self.uplink.publish_now(t, p, retain=r),
                subscribe=self.uplink.subscribe,
                on_aggregates=self._buffer_aggregates,
            )
            self.uplink.on_message = self.twin.handle
            self.uplink.on_connect = self.twin.on_connect
        self.on_running: list[Callable[[], None]] = []  # called in the event loop once run() has started
        self.jobs: JobClient | None = attach_jobs(self) if cfg.jobs.enabled else None
        self.source_errors = 0
        self.lost_aggregates = 0
        self.full_waits = 0
        self.started = time.monotonic()
        self._stop = asyncio.Event()

    # -- buffering ---------------------------------------------------------------------------
    def _buffer_aggregates(self, aggs: list[Aggregate]) -> None:
        groups, n, _ = self.pipeline.to_wire(
            Frame(
                dev=np.zeros(0, dtype=np.int32),
                ts_ms=np.zeros(0, dtype=np.int64),
                seq=np.zeros(0, dtype=np.int64),
                cols={},
                boot_id=self.boot_id,
            ),
            aggs,
        )
        if n:
            try:
                self.buffer.append(encode_record(groups), n)
            except BufferFull:
                # a timer or twin closed these windows: there is no source to hold back; count them
                self.lost_aggregates += n
                log.error("buffer full: %d window aggregate(s) could not be buffered", n)
            self.uplink.wake()
        self._save_windows()

    def _save_windows(self) -> None:
        """Write the window checkpoint atomically (fsynced when the buffer fsyncs every append)."""
        tmp = self._windows_path.with_suffix(".tmp")
        ck = {"windows": self.pipeline.pre.window_state(), "sources": self._positions}
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode(ck))
            if self.buffer.fsync == "always":
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self._windows_path)

    async def _append(self, payload: bytes, count: int, stop: asyncio.Event) -> bool:
        while True:
            try:
                self.buffer.append(payload, count)
                return True
            except BufferFull:
                if stop.is_set() and self.buffer.full_policy == "block":
                    return False
                self.full_waits += 1
                await asyncio.sleep(0.05)

    async def feed(self, source: Source, batch: SourceBatch, stop: asyncio.Event) -> None:
        """One batch: process, make durable, acknowledge the source, publish anomalies at once."""
        if tracing.enabled():
            traced = await self._feed_traced(source, batch, stop)
            if traced is None:
                return
            anomalies = traced
        else:
            groups, n, anomalies = self.pipeline.process(batch)
            if n:
                if not await self._append(encode_record(groups), n, stop):
                    return
                self.uplink.wake()
        if self.pipeline.pre.has_windows():
            # open windows hold readings the source is about to forget: checkpoint them, with the
            # source's new position, before acknowledging
            position = getattr(source, "position_after", None)
            if position is not None:
                self._positions[source.name] = position(batch)
            self._save_windows()
        await source.ack(batch)
        if anomalies and self.cfg.uplink.anomalies:
            for dev, r in anomalies:
                body = _json.encode(
                    {
                        "device_id": dev,
                        "ts": r.ts,
                        "seq": r.seq,
                        "boot_id": r.boot_id,
                        "measurements": r.measurements,
                        "meta": r.meta,
                    }
                )
                if self.uplink.publish_now(f"devices/{dev}/anomalies", body):
                    self.uplink.stats.anomalies += 1

    async def _feed_traced(
        self, source: Source, batch: SourceBatch, stop: asyncio.Event
    ) -> list[tuple[str, WireReading]] | None:
        """:meth:`feed`'s read and buffer steps in their spans: ``edge.read`` (the batch through the
        chain) and its child ``edge.buffer`` (made durable), whose context the buffer record keeps.
        Returns the anomalies, or None when stopping left the batch unbuffered."""
        with tracing.span("fieldmesh.edge", "edge.read",
                          {"fieldmesh.source": source.name, "fieldmesh.readings": len(batch)}):
            groups, n, anomalies = self.pipeline.process(batch)
            if n:
                with tracing.span("fieldmesh.edge", "edge.buffer", {"fieldmesh.readings": n}):
                    trace = tracing.headers_of_current()
                    record = encode_record(groups, trace.get("traceparent"), trace.get("tracestate"))
                    if not await self._append(record, n, stop):
                        return None
                self.uplink.wake()
        return anomalies

    async def _run_source(self, source: Source, stop: asyncio.Event) -> None:
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    async for batch in source.batches():
                        await self.feed(source, batch, stop)
                        backoff = 0.5
                        if stop.is_set():
                            break
                    return  # the source ended
                except Exception:
                    # one failing source must not take the agent (and the other sources) down
                    self.source_errors += 1
                    log.exception("source %s failed; restarting it in %.1fs", source.name, backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            await source.close()

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        last_stats = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(0.5, self.cfg.agent.stats_interval_s))
            self.buffer.sync(force=False)
            aggs = self.pipeline.pre.flush_windows(int(time.time() * 1000) - 2000, idle_ms=2000)
            if aggs:
                self._buffer_aggregates(aggs)
            now = time.monotonic()
            if now - last_stats >= self.cfg.agent.stats_interval_s:
                last_stats = now
                self.write_stats()

    # -- lifecycle -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of every stage."""
        return {
            "boot_id": self.boot_id,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "devices": len(self.pipeline.devices),
            "preprocess": dict(self.pipeline.pre.counters),
            "anomalies": self.pipeline.anomalies,
            "buffer": asdict(self.buffer.stats)
            | {
                "pending_readings": self.buffer.pending_readings,
                "size_bytes": self.buffer.size_bytes,
                "acked_seq": self.buffer.acked_seq,
            },
            "uplink": asdict(self.uplink.stats),
            "twin": {"applied": dict(self.twin.applied), "rejected": self.twin.rejected}
            if self.twin
            else None,
            "jobs": dict(self.jobs.counts) if self.jobs else None,
            "source_errors": self.source_errors,
            "full_waits": self.full_waits,
            "lost_aggregates": self.lost_aggregates,
            "schema": self.pipeline.contract.as_dict() if self.pipeline.contract else None,
        }

    def write_stats(self) -> None:
        """Write ``stats.json`` beside the buffer (atomic)."""
        p = self.state_dir / "stats.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.stats()))
        os.replace(tmp, p)

    def stop(self) -> None:
        """Ask a running agent to stop."""
        self._stop.set()

    async def run(
        self,
        *,
        duration_s: float | None = None,
        drain_s: float = 5.0,
        on_started: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Run until stopped (or ``duration_s``), then drain the buffer for up to ``drain_s``."""
        stop = self._stop
        uplink_stop = asyncio.Event()
        log.info(
            "edge agent %s: %d source(s), buffer %s (%d readings pending)",
            self.boot_id,
            len(self.sources),
            self.buffer.path,
            self.buffer.pending_readings,
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.uplink.run(uplink_stop), name="uplink")
            tg.create_task(self._housekeeping(stop), name="housekeeping")
            sc = self.cfg.schema_
            if sc is not None and sc.subject and sc.registry_url and self.pipeline.contract is not None:
                tg.create_task(register_schema(
                    self.pipeline.contract, registry_url=sc.registry_url, subject=sc.subject,
                    auth=sc.auth.get_secret_value() if sc.auth else None, stop=stop), name="schema")
            src_tasks = [tg.create_task(self._run_source(s, stop), name=s.name) for s in self.sources]
            for fn in self.on_running:
                fn()
            if on_started is not None:
                on_started()
            if duration_s is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=duration_s)
            else:
                await stop.wait()
            stop.set()
            for s in self.sources:
                await s.close()
            await asyncio.gather(*src_tasks, return_exceptions=True)
            if self.pipeline.pre.has_windows():
                self._save_windows()  # open windows continue at the next start
            self.buffer.sync()
            deadline = time.monotonic() + drain_s
            while self.buffer.pending_records and time.monotonic() < deadline and self.uplink.connected:
                self.uplink.wake()
                await asyncio.sleep(0.05)
            uplink_stop.set()
        self.buffer.close()
        self.write_stats()
        return self.stats()
