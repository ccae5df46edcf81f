"""The datasets of each fieldmesh job, for its OpenLineage run events (:mod:`fieldmesh.obs.lineage`).

Gateway: MQTT telemetry topics (or ingest topics) -> the bus's ingest and readings topics. Processor:
readings and dead-letter topics -> hot-store tables and the data products (with their latest quality
window as ``dataQualityMetrics``), and the canaries' (``canary_readings``, ``canary.<name>``). Each extra
sink (the lake) is its own job: readings topic -> its tables. The feature stage: the hot store's readings
(what the processor stored) -> one ``features.<view>`` dataset per view, in the hot store (offline rows)
and the online store. CDC: the source's tables -> the CDC topics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fieldmesh.core.settings import Settings
from fieldmesh.core.topics import DLQ_TOPIC, INGEST_TOPIC, READINGS_TOPIC
from fieldmesh.obs.lineage import Dataset, Lineage, bus_namespace, mqtt_namespace, store_namespace

__all__ = ["HOT_TABLES", "cdc_lineage", "feature_datasets", "gateway_datasets", "lake_datasets", "open_lineage",
           "processor_outputs"]

log = logging.getLogger(__name__)

HOT_TABLES = ("readings", "rollup_1m", "rollup_1h", "dlq")


def open_lineage(settings: Settings, store_url: str | None) -> Lineage | None:
    """The lineage emitter of a job, or None when lineage is off (or has neither a store nor an endpoint)."""
    import os

    ls = settings.lineage
    if not ls.enabled or (store_url is None and not (ls.url or os.environ.get("OPENLINEAGE_URL"))):
        return None
    return Lineage(store_url=store_url, url=ls.url, namespace=ls.namespace, interval_s=ls.interval_s)


def gateway_datasets(bus_url: str, mqtt_url: str | None, ingest_urls: Sequence[str] | None
                     ) -> tuple[list[Dataset], list[Dataset]]:
    """(inputs, outputs) of a gateway."""
    ins = [Dataset(mqtt_namespace(mqtt_url), "devices/+/telemetry")] if mqtt_url else []
    ins += [Dataset(bus_namespace(u), u.rsplit("/", 1)[-1]) for u in ingest_urls or []]
    if not ins:
        ins = [Dataset(bus_namespace(bus_url), INGEST_TOPIC)]
    ns = bus_namespace(bus_url)
    return ins, [Dataset(ns, READINGS_TOPIC), Dataset(ns, DLQ_TOPIC)]


def processor_outputs(store_url: str) -> Callable[[], list[Dataset]]:
    """The processor's outputs, read anew for each event: hot tables, and each product with its quality."""
    ns = store_namespace(store_url)

    def outputs() -> list[Dataset]:
        from fieldmesh.store.products import ProductTables

        out = [Dataset(ns, t) for t in HOT_TABLES]
        tables = ProductTables(store_url)
        try:
            for q in tables.all_quality(windows=2):
                latest = q.get("latest")
                quality: dict[str, Any] | None = None
                if latest is not None:
                    quality = {"rowCount": latest["new"], "columns": {
                        m: {"nullCount": v["nulls"], "count": v["values"]} for m, v in latest["metrics"].items()}}
                out.append(Dataset(ns, f"product.{q['product']}", quality))
        finally:
            tables.close()
        out += _canary_outputs(store_url, ns)
        return out

    return outputs


def _canary_outputs(store_url: str, ns: str) -> list[Dataset]:
    """``canary_readings`` and one ``canary.<name>`` per canary holding readings or routing (docs/canary.md)."""
    from fieldmesh.store.canary import CanaryTables

    tables = CanaryTables(store_url)
    try:
        names = [c["name"] for c in tables.canaries() if c["state"] == "active" or c["readings"]]
    finally:
        tables.close()
    return [Dataset(ns, "canary_readings"), *(Dataset(ns, f"canary.{n}") for n in names)] if names else []


def feature_datasets(store_url: str, online_url: str | None, views: Sequence[str]
                     ) -> tuple[list[Dataset], list[Dataset]]:
    """(inputs, outputs) of the feature stage: the hot store's ``readings`` -> ``features.<view>`` in the hot
    store (offline rows) and in the online store."""
    ns = store_namespace(store_url)
    outs = [Dataset(ns, f"features.{v}") for v in views]
    if online_url:
        scheme = online_url.split("://", 1)[0].lower()
        online_ns = store_namespace(online_url) if scheme in ("sqlite", "postgres", "postgresql") \
            else bus_namespace(online_url)
        outs += [Dataset(online_ns, f"features.{v}") for v in views]
    return [Dataset(ns, "readings")], outs



def lake_datasets(settings: Settings, bus_url: str, lake_dir: str) -> tuple[list[Dataset], list[Dataset]]:
    """(inputs, outputs) of the lake sink."""
    from fieldmesh.store.lake import TABLES

    ns = settings.lake.url or f"sqlite:///{lake_dir}/lake/catalog.db"
    ns = store_namespace(ns) if "://" in ns else ns
    return ([Dataset(bus_namespace(bus_url), READINGS_TOPIC)],
            [Dataset(f"iceberg+{ns}", f"{settings.lake.namespace}.{t}") for t in TABLES])


def cdc_lineage(source: str, tables: str, bus_url: str, store_url: str | None
                ) -> tuple[Lineage, list[Dataset], list[Dataset]] | None:
    """The CDC capture's emitter and (inputs, outputs): the source's tables -> their ``fm.cdc.*`` topics; None
    without a store to keep events in nor an endpoint to send them to."""
    import os

    from fieldmesh.cdc.base import cdc_topic
    from fieldmesh.runtime.enrichment import source_database

    if store_url is None and not os.environ.get("OPENLINEAGE_URL"):
        return None
    db = source_database(source)
    ns = store_namespace(source) if source.startswith("postgres") else mqtt_namespace(source).replace("mqtt", "mysql")
    ins, outs = [], []
    for raw in tables.split(","):
        name = raw.strip()
        if not name:
            continue
        schema, _, table = name.rpartition(".")
        schema = schema or "public"
        ins.append(Dataset(ns, f"{schema}.{table}"))
        # named as the capture names its topics (runtime/up.py: _captured)
        topic = cdc_topic(db, schema, table) if db else cdc_topic(schema, None, table)
        outs.append(Dataset(bus_namespace(bus_url), topic))
    return Lineage(store_url=store_url), ins, outs
