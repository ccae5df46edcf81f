"""Stage workers: each stage runs as its own process (``python -m fieldmesh.runtime.worker``).

``fieldmesh up`` starts one gateway and one processor worker next to the embedded nats-server so
that they use both cores; the stand-alone roles (``fieldmesh gateway``/``process``) run the same
code. SIGTERM/SIGINT stop a worker after the batch in hand is committed and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fieldmesh.bus import Bus, TopicSpec, load_bus
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import Settings, load_settings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.obs.lineage import Dataset, bus_namespace
from fieldmesh.runtime.lineage import (
    feature_datasets,
    gateway_datasets,
    lake_datasets,
    open_lineage,
    processor_outputs,
)

__all__ = ["ensure_topics", "freeze_startup_objects", "run_gateway", "run_processor"]

log = logging.getLogger("fieldmesh.worker")


async def ensure_topics(bus: Bus, settings: Settings) -> None:
    """Create the readings and DLQ topics with the configured partitions and retention."""
    b = settings.bus
    await bus.ensure_topic(TopicSpec(READINGS_TOPIC, b.partitions, b.retention_s, b.dedupe_window_s))
    await bus.ensure_topic(TopicSpec(DLQ_TOPIC, 1, b.retention_s, b.dedupe_window_s))


#: Set once SIGTERM or SIGINT reached this process: a role's restart loop (``fieldmesh.cli``) must not start
#: it again after an outage it was waiting out (a signal during a connection attempt would be lost otherwise).
STOP_SIGNALLED = threading.Event()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        STOP_SIGNALLED.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stop


def _wire_schemas(url: str, settings: Settings) -> Any:
    """The gateway's schema decoders, reading the schema registry on ``url`` once one is needed."""
    from fieldmesh.gateway.schemas import registry_schemas

    def open_registry() -> Any:
        from fieldmesh.schema.registry import SchemaRegistry
        from fieldmesh.store.schemas import SchemaStore

        return SchemaRegistry(SchemaStore(url))

    return registry_schemas(open_registry, latest_ttl_s=settings.gateway.schema_subject_refresh_s)


async def run_gateway(
    *, bus_url: str, mqtt_url: str | None, settings: Settings, stop: asyncio.Event | None = None,
    client_id: str | None = None, sole: bool = False, ingest_urls: list[str] | None = None,
    ingest_bus_url: str | None = None, registry_url: str | None = None, schemas_url: str | None = None,
    mqtt_auth_file: str | None = None, lineage_store: str | None = None,
) -> None:
    """Run a gateway: from an MQTT broker and/or ingest topics (``ingest_urls``: Kafka topics, NATS
    subjects), else from the embedded ingest stream (on ``ingest_bus_url``, the embedded
    nats-server, when the bus is another one such as Kafka). Each source runs its own gateway loop.

    ``registry_url``: the hot store holding the device registry, read when registration is enforced.
    ``schemas_url``: the hot store holding the schema registry, opened at the first payload written
    against a registered schema (docs/schemas.md); without it such payloads are ``unknown_schema``.
    The sources share one admission (registry view and rate limits). ``mqtt_auth_file`` (JSON
    ``{"user", "password"}``) holds the broker credentials, kept off the command line (``fieldmesh up``
    passes its internal user this way to the Mosquitto door). ``lineage_store``: the hot store keeping
    the gateway's OpenLineage run events (docs/lineage.md); None: no events."""
    from fieldmesh.gateway.admission import build_admission
    from fieldmesh.gateway.gateway import Gateway
    from fieldmesh.gateway.ingress import load_ingest
    from fieldmesh.gateway.sources import MqttSource, NatsIngestSource

    def open_registry() -> Any:
        from fieldmesh.store.registry import DeviceRegistry

        return DeviceRegistry(registry_url or "")

    admission = build_admission(settings.gateway, open_registry if registry_url else None)
    schemas = _wire_schemas(schemas_url, settings) if schemas_url else None
    stop = stop or _stop_event()
    async with contextlib.AsyncExitStack() as stack:
        bus = await stack.enter_async_context(load_bus(bus_url))
        await ensure_topics(bus, settings)
        sources: list[Any] = [load_ingest(u, retention_s=settings.bus.retention_s) for u in ingest_urls or []]
        if mqtt_url:
            if mqtt_auth_file:
                mqtt_url = _with_credentials(mqtt_url, mqtt_auth_file)
            g = settings.gateway
            sources.append(MqttSource(mqtt_url, share_group=g.share_group, client_id=client_id,
                                      session_expiry_s=g.session_expiry_s, receive_maximum=g.receive_maximum))
        elif not sources:
            door = bus if ingest_bus_url in (None, bus_url) else await stack.enter_async_context(
                load_bus(ingest_bus_url or ""))
            sources.append(NatsIngestSource(door, retention_s=settings.bus.retention_s, sole=sole))
        started: list[Any] = []
        gateways: list[Gateway] = []
        try:
            for source in sources:
                await source.start()
                started.append(source)
            if (lineage := open_lineage(settings, lineage_store)) is not None:
                stack.callback(lineage.close)
                ins, outs = gateway_datasets(bus_url, mqtt_url, ingest_urls)
                await stack.enter_async_context(lineage.run("fieldmesh.gateway", inputs=ins, outputs=outs))
            async with asyncio.TaskGroup() as tg:
                if admission is not None and admission.registered is not None:
                    tg.create_task(admission.registered.run(stop), name="gateway-registry")
                for source in sources:
                    gw = Gateway(source=source, producer=bus.producer(), settings=settings.gateway,
                                 partitions=settings.bus.partitions, admission=admission, schemas=schemas)
                    gateways.append(gw)
                    log.info("gateway running: %s -> %s", _redact(getattr(source, "url", source.name)),
                             _redact(bus_url))
                    tg.create_task(gw.run(stop), name=f"gateway-{source.name}")
                freeze_startup_objects()  # its sources are started: what it holds now stays
        finally:
            for source in started:
                await source.close()
            for gw in gateways:
                st = gw.stats
                log.info("gateway %s stopped: %d messages, %d readings, rejected %s", gw.source.name,
                         st.messages, st.readings, st.rejected)
            if schemas is not None and schemas.fetches:
                log.info("schema registry: %d schema reads, %d failed", schemas.fetches, schemas.errors)
            if admission is not None and admission.registered is not None:
                reg = admission.registered
                log.info("device registry: version %s, %d active devices, %d failed reads", reg.version,
                         len(reg.active), reg.errors)


async def run_processor(
    *, bus_url: str, store_url: str, settings: Settings, partitions: list[int] | None = None,
    group: str = "fm-processor", stop: asyncio.Event | None = None, lake_dir: str | None = None,
) -> None:
    """Run a processor over ``partitions`` (all when None), enriching readings when
    ``settings.enrich`` has joins (the CDC topics are caught up with before the first reading).

    With ``lake_dir`` (the data dir: ``fieldmesh up`` passes it when ``settings.lake.enabled``, ``fieldmesh
    process`` with ``--lake``), committed batches also go to the lake, written by a child process
    (:class:`fieldmesh.store.lakeproc.LakeProcess`) that commits what it buffered when the processor stops.
    Several processors (``partitions``) may write one lake: each records its partitions' positions.
    """
    from fieldmesh.runtime.enrichment import build_enrichment, follower_group
    from fieldmesh.store import load_store
    from fieldmesh.stream.processor import Processor

    stop = stop or _stop_event()
    enrichment = build_enrichment(settings)
    sinks: list[Any] = []
    lake = None
    if lake_dir is not None:
        from fieldmesh.store.lakeproc import LakeProcess

        # of several processors writing one lake, the one owning partition 0 copies the feature rows and
        # runs the maintenance (docs/lake.md)
        lake_settings = settings.lake if _lake_owner(partitions) else settings.lake.model_copy(
            update={"maintenance_interval_s": 0.0})
        lake = LakeProcess(settings=lake_settings, data_dir=Path(lake_dir), writer=_writer(partitions))
        sinks.extend(lake.views())
        log.info("lake: committing to %s every %gs at most (writer %s)", settings.lake.url or f"{lake_dir}/lake",
                 settings.lake.commit_interval_s, _writer(partitions) or "alone")
    store = load_store(store_url, rollup_flush_ms=settings.processor.rollup_flush_ms)
    notifier = None
    lineage = open_lineage(settings, store_url)
    rules_file = None
    retention = None
    try:
        if settings.alerts.enabled and settings.alerts.rules_file is not None:  # loaded again when it changes
            from fieldmesh.runtime.rulesfile import RulesFile

            rules_file = RulesFile(settings.alerts.rules_file, store_url, interval_s=settings.alerts.rules_file_poll_s)
        alerts, notifier = _alerting(store, store_url, settings, rules_file)
        if rules_file is not None:
            rules_file.start()
        products = _products(store, store_url, settings)
        features = _features(store, settings, partitions)
        sinks.extend(features)
        if lake is not None and settings.features.views_file is not None and _lake_owner(partitions):
            lake.read_features(store_url)  # the lake's features table copies the hot store's feature rows
        async with load_bus(bus_url) as bus:
            await ensure_topics(bus, settings)
            proc = Processor(bus=bus, store=store, settings=settings.processor, group=group,
                             partitions=partitions, total_partitions=settings.bus.partitions,
                             enricher=enrichment.enricher if enrichment else None, sinks=sinks,
                             alerts=alerts, alert_tick_s=settings.alerts.tick_s, products=products)
            if notifier is not None:  # the notifier's transactions take turns with the batches
                notifier.run_store = proc.in_apply_thread
                notifier.submit_store = proc.submit_in_apply_thread
            if lake_dir is None or _lake_owner(partitions):  # of several lake writers, one prunes
                retention = _retention(store, proc, settings, lake_dir)

            def running() -> None:
                # logged once records are fetched: `up`'s /health says "starting" for the processor until then
                log.info("processor running: %s -> %s (partitions %s)", bus_url, store_url, partitions or "all")
                freeze_startup_objects()

            proc.on_running = running
            async with contextlib.AsyncExitStack() as runs:  # lineage: one OpenLineage run per job
                if lineage is not None:
                    await runs.enter_async_context(lineage.run(
                        "fieldmesh.processor", inputs=[Dataset(bus_namespace(bus_url), READINGS_TOPIC),
                                                       Dataset(bus_namespace(bus_url), DLQ_TOPIC)],
                        outputs=processor_outputs(store_url)))
                    if lake_dir is not None:
                        ins, outs = lake_datasets(settings, bus_url, lake_dir)
                        await runs.enter_async_context(lineage.run("fieldmesh.sink.lake", inputs=ins, outputs=outs))
                    if features:  # the feature stage: stored readings -> its views (docs/lineage.md)
                        ins, outs = feature_datasets(store_url, settings.features.online(settings.data_dir),
                                                     [v.name for v in features[0].views])
                        await runs.enter_async_context(lineage.run("fieldmesh.features", inputs=ins, outputs=outs))
                if enrichment is None:
                    await proc.run(stop)
                else:
                    await enrichment.run(bus, proc.run, stop, follower_group=follower_group(group, partitions))
    finally:
        if rules_file is not None:
            rules_file.stop()
        if lineage is not None:
            lineage.close()
        if retention is not None:
            retention.stop()
        if notifier is not None:
            notifier.stop()
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.exception("sink %s did not close cleanly: what it had not committed comes again from the bus "
                              "at the next start", sink.name)
        store.close()


def _retention(store: Any, proc: Any, settings: Settings, lake_dir: str | None) -> Any:
    """Retention of the hot tiers on a schedule (docs/lake.md), its transactions in turn with the batches;
    it verifies against the lake, so it runs where the lake is written (or, told so, without one)."""
    from fieldmesh.store.tiers import LakeCopy, RetentionLoop

    open_lake = None
    if lake_dir is not None:
        from fieldmesh.store.lake import open_catalog

        def open_lake() -> LakeCopy:
            return LakeCopy(open_catalog(settings.lake, Path(lake_dir)), settings.lake.namespace)

    return RetentionLoop(store, settings=settings.retention, open_lake=open_lake,
                         transact=proc.in_apply_thread).start()


def _redact(url: str) -> str:
    """A URL as logged: a password in it is ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _with_credentials(url: str, auth_file: str) -> str:
    from urllib.parse import quote, urlsplit, urlunsplit

    doc = json.loads(Path(auth_file).read_text())
    u = urlsplit(url)
    netloc = f"{quote(str(doc['user']), safe='')}:{quote(str(doc['password']), safe='')}@{u.hostname}"
    return urlunsplit(u._replace(netloc=netloc + (f":{u.port}" if u.port else "")))


def _alerting(store: Any, store_url: str, settings: Settings, rules_file: Any = None) -> tuple[Any, Any]:
    """The processor's alert stage and notifier (docs/alerts.md); the rules file (``rules_file``, a
    :class:`~fieldmesh.runtime.rulesfile.RulesFile`, or the settings') loaded into the store first."""
    from fieldmesh.runtime.rulesfile import RulesFile
    from fieldmesh.stream.alerting import AlertEngine
    from fieldmesh.stream.notifier import Notifier

    a = settings.alerts
    if not a.enabled:
        return None, None
    if a.rules_file is not None:
        (rules_file or RulesFile(a.rules_file, store_url)).load()
    engine = AlertEngine(store)
    notifier = None
    if a.notify:
        notifier = Notifier(store, wake=engine.notify, mqtt_url=a.mqtt_url, timeout_s=a.webhook_timeout_s,
                            retry_max_s=a.retry_max_s)
        engine.hand = notifier.hand
        notifier.defer_acked = engine.acked
        notifier.start()
    return engine, notifier


#: Allocations of container objects between two collections of the youngest generation (CPython's default:
#: 700). A stage allocates a few containers per message (a decoded payload's dicts, lists): at 700 the
#: collector ran some 6,000 times in a million messages and scanned each batch's live objects again and
#: again, 0.6-0.8 s of a 10 CPU-second run (bench/vs_quix.py, one process; 0.06 s at this threshold). Nearly
#: all of it is freed by reference counting; cycles wait at most this many allocations longer.
GC_THRESHOLD0 = 100_000


def freeze_startup_objects() -> None:
    """Leave what the process holds at start (modules, classes, functions: some 10^5 objects) out of the
    garbage collector's full passes, and collect the youngest generation less often (:data:`GC_THRESHOLD0`).
    Each full pass walked the startup objects, 40-100 ms during which the batch in hand stood still (a tail
    of event -> alert latency); what the batches allocate is still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])


def _lake_owner(partitions: list[int] | None) -> bool:
    """Whether this processor copies feature rows to the lake and maintains it (of several, partition 0's)."""
    return partitions is None or 0 in partitions


def _writer(partitions: list[int] | None) -> str | None:
    """The lake writer name of a processor over ``partitions`` (None: all partitions, the only writer)."""
    return None if partitions is None else "partitions " + ",".join(map(str, sorted(partitions)))


def _features(store: Any, settings: Settings, partitions: list[int] | None) -> list[Any]:
    """The processor's feature stage (docs/features.md) when ``settings.features.views_file`` is set."""
    f = settings.features
    if f.views_file is None:
        return []
    from fieldmesh.store.features import load_online_store
    from fieldmesh.stream.featureviews import load_feature_views
    from fieldmesh.stream.featuring import FeatureStage

    views = load_feature_views(f.views_file)
    url = f.online(settings.data_dir)
    online = load_online_store(url, ttl_ms={v.name: v.ttl_ms for v in views})
    log.info("features: %d views from %s, online store %s", len(views), f.views_file, _redact(url))
    return [FeatureStage(store=store, views=views, online=online, partitions=partitions)]


def _canaries_of(path: Path, store_url: str) -> None:
    """The canaries declared in a products file (``canaries:``, docs/canary.md), created when new."""
    import yaml

    from fieldmesh.store.canary import CanaryTables
    from fieldmesh.stream.canary import CanaryError, canaries_from_yaml

    text = path.read_text()
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not doc.get("canaries"):
        return
    try:
        canaries = canaries_from_yaml(text)
    except CanaryError as exc:
        raise ConfigError(f"{path}: {exc}", key="products.products_file") from exc
    tables = CanaryTables(store_url)
    try:
        counts = tables.apply(canaries, actor="file")
    finally:
        tables.close()
    log.info("canaries from %s: %d (%s)", path, len(canaries), counts)


def _products(store: Any, store_url: str, settings: Settings) -> Any:
    """The processor's data-product stage (docs/products.md); the products file loaded into the store first."""
    from fieldmesh.store.products import ProductTables
    from fieldmesh.stream.products import ProductEngine
    from fieldmesh.stream.quality import ProductError, products_from_yaml

    ps = settings.products
    if not ps.enabled:
        return None
    if ps.products_file is not None:
        path = ps.products_file.resolve()
        try:
            products = products_from_yaml(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the products file {path}: {exc}", key="products.products_file") from exc
        except ProductError as exc:
            raise ConfigError(f"{path}: {exc}", key="products.products_file") from exc
        tables = ProductTables(store_url)
        try:
            counts = tables.apply(products, actor="file", source=f"file:{path}")
        finally:
            tables.close()
        log.info("data products from %s: %d (%s)", path, len(products), counts)
        _canaries_of(path, store_url)
    return ProductEngine(store)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m fieldmesh.runtime.worker ROLE JSON``."""
    args = argv if argv is not None else sys.argv[1:]
    role, cfg = args[0], json.loads(args[1])
    from fieldmesh.obs import logs, tracing

    logs.setup_logging(role, fmt=f"%(asctime)s {role} %(levelname)s %(message)s")
    tracing.setup(f"fieldmesh-{role}")
    settings = load_settings(**cfg.pop("settings", {}))
    with contextlib.suppress(KeyboardInterrupt):
        if role == "gateway":
            asyncio.run(run_gateway(settings=settings, **cfg))
        elif role == "processor":
            asyncio.run(run_processor(settings=settings, **cfg))
        elif role == "twins":
            from fieldmesh.runtime.twins import run_twins

            asyncio.run(run_twins(**cfg))
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
