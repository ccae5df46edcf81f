"""The ``fieldmesh`` command: one command, a sub-command per role."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh import __version__
from fieldmesh.core.errors import ConfigError, FieldmeshError

__all__ = ["app", "main"]

app = typer.Typer(
    name="fieldmesh",
    help="fieldmesh: IoT telemetry from the sensor to the lakehouse, exact and durable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="FIELDMESH_DATA_DIR", help="where the embedded bus and store keep data"),
]
DEFAULT_DATA_DIR = Path(".fieldmesh")
HttpHost = Annotated[str, typer.Option(
    "--http-host", envvar="FIELDMESH_HTTP_HOST",
    help="address the REST API listens on; beyond loopback (e.g. 0.0.0.0) it needs authentication configured: "
         "an admin key (fieldmesh keys create) or an OpenID Connect issuer (docs/security.md)")]
TlsCert = Annotated[Path | None, typer.Option(
    "--tls-cert", envvar="FIELDMESH_TLS_CERT", help="serve the API over HTTPS with this certificate chain (PEM)")]
TlsKey = Annotated[Path | None, typer.Option(
    "--tls-key", envvar="FIELDMESH_TLS_KEY", help="the private key (PEM) of --tls-cert")]
RulesOpt = Annotated[
    Path | None,
    typer.Option("--rules", help="alert rules: a YAML list of rules, loaded into the store at start (docs/alerts.md)"),
]
FeaturesOpt = Annotated[Path | None, typer.Option(
    "--features", help="feature views: a YAML file; the processor computes them into the online store and the "
    "feature_rows table (docs/features.md)")]
OnlineUrlOpt = Annotated[str | None, typer.Option(
    "--online-url", help="online feature store: redis://host:port/db?prefix=fm (default: SQLite features.db in "
    "the data dir) [env FIELDMESH__FEATURES__ONLINE_URL]")]
ProductsOpt = Annotated[
    Path | None,
    typer.Option("--products", help="data products: a YAML list, loaded into the store at start (docs/products.md)"),
]
LineageUrlOpt = Annotated[str | None, typer.Option(
    "--lineage-url", envvar="OPENLINEAGE_URL",
    help="send OpenLineage run events to this HTTP endpoint (as the standard client's OPENLINEAGE_URL; they are "
         "kept in the hot store either way, docs/lineage.md)")]
RequireRegistration = Annotated[bool, typer.Option(
    "--require-registration", help="refuse devices not registered as active in the device registry (DLQ "
    "unknown_device; suspended or retired: unauthorized) [env FIELDMESH__GATEWAY__REQUIRE_REGISTRATION]")]
MetricsPort = Annotated[int | None, typer.Option(
    "--metrics-port", min=0, max=65535,
    help="serve this process's stage metrics (rates, batch sizes, latencies) on http://--metrics-host:PORT/metrics "
         "for Prometheus (docs/observability.md)")]
MetricsHost = Annotated[str, typer.Option("--metrics-host", help="address of --metrics-port")]
EnrichOpt = Annotated[
    list[str] | None,
    typer.Option(help="as-of join of readings with a CDC table (repeatable), e.g. "
                 "'public.assets:device_id=device_id:fields=threshold,site' (see docs/cdc.md)"),
]


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _role_logging(role: str) -> None:
    """Log lines of a stand-alone role (assignments, retries, failures) on stderr."""
    from fieldmesh.obs import logs, tracing

    logs.setup_logging(role, fmt=f"%(asctime)s {role} %(name)s %(levelname)s %(message)s")
    tracing.setup(f"fieldmesh-{role}")


def _settings(**kw: Any) -> Any:
    from fieldmesh.core.settings import load_settings

    return load_settings(**kw)


@app.callback()
def _root(
    log_json: Annotated[bool, typer.Option(
        "--log-json", envvar="FIELDMESH_LOG_JSON",
        help="log lines as JSON objects with trace_id and span_id (also in the processes 'up' starts); "
             "docs/observability.md")] = False,
) -> None:
    """fieldmesh: IoT telemetry from the sensor to the lakehouse, exact and durable."""
    if log_json:
        os.environ["FIELDMESH_LOG_JSON"] = "1"  # the processes this one starts log JSON too


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def up(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    mqtt_port: Annotated[int | None, typer.Option(
        min=0, max=65535, show_default=False,
        help="MQTT listener port: default 1883, or a free one (said) when 1883 is taken; 0: a free one")] = None,
    http_port: Annotated[int | None, typer.Option(
        min=0, max=65535, show_default=False,
        help="REST API port: default 8000, or a free one (said) when 8000 is taken; 0: a free one")] = None,
    mqtt_url: Annotated[str | None, typer.Option(help="use an external MQTT broker, e.g. mqtt://host:1883")] = None,
    bus_url: Annotated[str | None, typer.Option(help="use an external bus (nats://...)")] = None,
    store_url: Annotated[str | None, typer.Option(help="use an external hot store")] = None,
    simulate: Annotated[int, typer.Option(min=0, help="run N simulated devices")] = 0,
    sim_rate: Annotated[float, typer.Option(min=0.001, help="readings/s per simulated device")] = 1.0,
    sim_per_message: Annotated[int, typer.Option(min=1, help="readings per simulated MQTT message")] = 1,
    partitions: Annotated[int, typer.Option(min=1, max=4096, help="bus partitions")] = 8,
    fsync: Annotated[str, typer.Option(help="JetStream sync_interval: 'always' or a duration like 2m")] = "2m",
    for_: Annotated[float | None, typer.Option("--for", min=0.1, help="stop after SECONDS")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print the final summary as JSON on stdout (and no summary table)")] = False,
    cdc_source: Annotated[str | None, typer.Option(
        help="capture this database's changes (postgresql://... or mysql://...)")] = None,
    cdc_tables: Annotated[str | None, typer.Option(help="tables to capture, e.g. public.assets,public.maint")] = None,
    cdc_name: Annotated[str | None, typer.Option(help="CDC slot/publication/offsets name")] = None,
    enrich: EnrichOpt = None,
    rules: RulesOpt = None,
    features: FeaturesOpt = None,
    online_url: OnlineUrlOpt = None,
    products: ProductsOpt = None,
    lineage_url: LineageUrlOpt = None,
    door: Annotated[str | None, typer.Option(
        help="MQTT door: nats (MQTT 3.1.1, PUBACK after JetStream stored it; the default, auto) or mosquitto "
             "(MQTT 3.1.1 and 5, PUBACK from Mosquitto's memory) [env FIELDMESH__GATEWAY__DOOR]")] = None,
    http_host: HttpHost = "127.0.0.1",
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    lake: Annotated[bool | None, typer.Option(
        "--lake/--no-lake", show_default=False,
        help="write readings, rollups and dead letters to Iceberg tables (on by default; docs/lake.md) "
             "[env FIELDMESH__LAKE__ENABLED]")] = None,
    lake_url: Annotated[str | None, typer.Option(
        help="Iceberg catalog: http(s)://... (REST) or sqlite:///... / postgresql://... (SQL); default: an "
             "SQLite catalog under the data dir [env FIELDMESH__LAKE__URL]")] = None,
    lake_warehouse: Annotated[str | None, typer.Option(
        help="where the lake's data files go (file://, s3://, gs://, abfs://) [env FIELDMESH__LAKE__WAREHOUSE]"),
    ] = None,
    lake_commit_interval: Annotated[float | None, typer.Option(
        min=0.01, help="seconds between lake commits at most (default 60) [env FIELDMESH__LAKE__COMMIT_INTERVAL_S]")
    ] = None,
    retention_raw_days: Annotated[float | None, typer.Option(
        min=0, show_default=False, help="keep raw readings in the hot store this many days (default 7; 0: forever); "
        "older ones leave it once the lake holds them [env FIELDMESH__RETENTION__RAW_DAYS]")] = None,
    retention_1m_days: Annotated[float | None, typer.Option(
        min=0, show_default=False, help="keep 1-minute rollups this many days (default 90; 0: forever) "
        "[env FIELDMESH__RETENTION__ROLLUP_1M_DAYS]")] = None,
    retention_1h_days: Annotated[float | None, typer.Option(
        min=0, show_default=False, help="keep 1-hour rollups this many days (default 0: forever) "
        "[env FIELDMESH__RETENTION__ROLLUP_1H_DAYS]")] = None,
    mqtt_host: Annotated[str, typer.Option(
        envvar="FIELDMESH_MQTT_HOST",
        help="address the MQTT door's TLS listener binds (the nats door: its only listener); beyond loopback it "
             "needs --require-client-cert (docs/security.md)")] = "127.0.0.1",
    mqtt_tls_port: Annotated[int | None, typer.Option(
        min=1, max=65535, show_default=False,
        help="MQTT over TLS on this port (default 8883 when --mqtt-tls-cert is given); the nats door then serves "
             "TLS only, the mosquitto door keeps its plain listener on loopback")] = None,
    mqtt_tls_cert: Annotated[Path | None, typer.Option(
        envvar="FIELDMESH_MQTT_TLS_CERT", help="the MQTT door's server certificate chain (PEM)")] = None,
    mqtt_tls_key: Annotated[Path | None, typer.Option(
        envvar="FIELDMESH_MQTT_TLS_KEY", help="the private key (PEM) of --mqtt-tls-cert")] = None,
    mqtt_ca: Annotated[Path | None, typer.Option(
        envvar="FIELDMESH_MQTT_CA", help="the CA (PEM) that signs device certificates")] = None,
    require_client_cert: Annotated[bool, typer.Option(
        "--require-client-cert",
        help="devices must present a certificate of --mqtt-ca that the device registry holds as valid, for an "
             "active device; each is confined to its own topics")] = False,
    require_registration: RequireRegistration = False,
    slo: Annotated[Path | None, typer.Option(
        "--slo", help="service level objectives (YAML: freshness, latency, dlq_rate): status in /metrics, "
                      "breaches as alerts slo:<name> (docs/observability.md)")] = None,
) -> None:
    """Run the whole pipeline on embedded defaults (MQTT -> gateway -> bus -> processor -> store -> API)."""
    from fieldmesh.runtime.up import DEFAULT_HTTP_PORT, DEFAULT_MQTT_PORT, UpOptions, run_up

    cdc = {k: v for k, v in (("source", cdc_source), ("tables", cdc_tables), ("name", cdc_name)) if v is not None}
    lake_kw = {k: v for k, v in (("enabled", lake), ("url", lake_url), ("warehouse", lake_warehouse),
                                 ("commit_interval_s", lake_commit_interval)) if v is not None}
    retention = {k: v for k, v in (("raw_days", retention_raw_days), ("rollup_1m_days", retention_1m_days),
                                   ("rollup_1h_days", retention_1h_days)) if v is not None}
    gw = {**({"door": door} if door is not None else {}),
          **({"require_registration": True} if require_registration else {})}
    try:
        door_tls = _door_tls(mqtt_tls_port, mqtt_tls_cert, mqtt_tls_key, mqtt_ca, require_client_cert)
        settings = _settings(bus={"partitions": partitions, "fsync": fsync}, data_dir=data_dir,
                             **({"gateway": gw} if gw else {}),
                             **({"lake": lake_kw} if lake_kw else {}),
                             **({"retention": retention} if retention else {}),
                             **_enrich_kw(enrich, None), **({"cdc": cdc} if cdc else {}), **_rules_kw(rules),
                             **_features_kw(features, online_url), **_products_kw(products),
                             **({"lineage": {"url": lineage_url}} if lineage_url else {}))
        opts = UpOptions(
            data_dir=data_dir, mqtt_url=mqtt_url, bus_url=bus_url,
            # a port left to its default gives way to a free one when taken; a chosen one is an error then
            mqtt_port=DEFAULT_MQTT_PORT if mqtt_port is None else mqtt_port, mqtt_port_chosen=mqtt_port is not None,
            http_port=DEFAULT_HTTP_PORT if http_port is None else http_port, http_port_chosen=http_port is not None,
            store_url=store_url, simulate=simulate, sim_rate=sim_rate, sim_per_message=sim_per_message,
            duration_s=for_, settings=settings, summary_table=not as_json,
            http_host=http_host, tls_cert=tls_cert, tls_key=tls_key, mqtt_host=mqtt_host, mqtt_tls=door_tls,
            slo_file=slo,
        )
        summary = asyncio.run(run_up(opts))
    except FieldmeshError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(summary))


def _door_tls(port: int | None, cert: Path | None, key: Path | None, ca: Path | None, require: bool) -> Any:
    """The door's TLS from the ``up`` flags (None without them), or a ConfigError naming the missing one."""
    from fieldmesh.core.errors import ConfigError
    from fieldmesh.runtime.doorauth import DoorTls

    if cert is None and key is None and ca is None and port is None and not require:
        return None
    if cert is None or key is None:
        missing = "--mqtt-tls-cert" if cert is None else "--mqtt-tls-key"
        raise ConfigError(f"MQTT over TLS needs --mqtt-tls-cert and --mqtt-tls-key: {missing} is missing",
                          key=missing.strip("-").replace("-", "_"))
    return DoorTls(port=port or 8883, cert=cert.resolve(), key=key.resolve(), ca=ca.resolve() if ca else None,
                   require_client_cert=require)


def _lake_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyiceberg") is not None and importlib.util.find_spec("duckdb") is not None


def _store_url(data_dir: Path, store_url: str | None) -> str:
    from fieldmesh.store import default_store_url

    return store_url or default_store_url(data_dir)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="one read-only SQL statement")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: Annotated[str | None, typer.Option(help="query this store instead of the data dir's")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print rows as JSON objects")] = False,
    tiers: Annotated[bool, typer.Option(
        "--tiers", help="run SQL (DuckDB's dialect) over readings, rollup_1m and rollup_1h across the hot store "
        "and the lake: older than the retention cut from the lake (docs/lake.md)")] = False,
    start: Annotated[str | None, typer.Option(help="with --tiers: only rows at or after this time (RFC 3339 or "
                                              "epoch ms)")] = None,
    end: Annotated[str | None, typer.Option(help="with --tiers: only rows before this time")] = None,
    device_id: Annotated[str | None, typer.Option(help="with --tiers: only this device's rows")] = None,
    lake_url: Annotated[str | None, typer.Option(
        help="with --tiers: the Iceberg catalog (default: the data dir's) [env FIELDMESH__LAKE__URL]")] = None,
) -> None:
    """Query the hot store (read-only): tables readings, rollup_1m, rollup_1h, devices, dlq, counters; with
    --tiers, readings and rollups across the hot store and the lake."""
    from fieldmesh.store import load_store

    try:
        store = load_store(_store_url(data_dir, store_url), readonly=True)
        res = _tiered_query(store, sql, data_dir, lake_url, start, end, device_id) if tiers else store.query(sql)
    except FieldmeshError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps([dict(zip(res.columns, r, strict=True)) for r in res.rows], default=str))
        return
    from rich.table import Table

    t = Table(*res.columns)
    for row in res.rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    Console().print(t)
    err.print(f"{len(res.rows)} row(s)")


def _tiered_query(store: Any, sql: str, data_dir: Path, lake_url: str | None, start: str | None, end: str | None,
                  device_id: str | None) -> Any:
    from fieldmesh.api.params import parse_time
    from fieldmesh.store.tiers import TieredReads, tiered_query

    lake = _settings(**({"lake": {"url": lake_url}} if lake_url else {})).lake
    catalog = None
    if lake.enabled and _lake_installed():
        from fieldmesh.store.lake import open_catalog

        def catalog() -> Any:
            return open_catalog(lake, data_dir)

    try:
        start_ms, end_ms = parse_time(start, "start"), parse_time(end, "end")
    except Exception as exc:  # the API's 400 answer
        raise ConfigError(str(getattr(exc, "detail", exc)), key="start") from None
    reads = TieredReads(store, open_catalog=catalog, namespace=lake.namespace)
    return tiered_query(reads, sql, start_ms=start_ms, end_ms=end_ms, device_id=device_id)


@app.command()
def simulate(
    mqtt_url: Annotated[str, typer.Option(help="broker to publish to")] = "mqtt://127.0.0.1:1883",
    devices: Annotated[int, typer.Option(min=1)] = 10,
    rate: Annotated[float, typer.Option(min=0.001, help="readings/s per device")] = 1.0,
    per_message: Annotated[int, typer.Option(min=1)] = 1,
    for_: Annotated[float | None, typer.Option("--for", min=0.1, help="stop after SECONDS")] = None,
    qos: Annotated[int, typer.Option(min=0, max=1)] = 1,
) -> None:
    """Run simulated devices that publish telemetry over MQTT."""
    from fieldmesh.runtime.devices import run_fleet

    try:
        n = run_fleet(mqtt_url=mqtt_url, devices=devices, rate_hz=rate, per_message=per_message,
                      duration_s=for_, qos=qos)
    except ConnectionError as exc:
        _fail(exc)
        return
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    err.print(f"sent {n:,} readings")


@app.command()
def gateway(
    bus_url: Annotated[str, typer.Option(help="the bus, e.g. nats://host:4222 or kafka://host:9092")],
    mqtt_url: Annotated[str | None, typer.Option(help="the MQTT broker devices publish to")] = None,
    ingest_url: Annotated[list[str] | None, typer.Option(
        help="a topic of raw readings: kafka://host:9092/TOPIC or nats://host:4222/SUBJECT (repeatable)")] = None,
    partitions: Annotated[int, typer.Option(min=1, max=4096)] = 8,
    client_id: Annotated[str | None, typer.Option(help="stable MQTT client id (persistent session)")] = None,
    store_url: Annotated[str | None, typer.Option(
        help="the hot store holding the device registry (needed with --require-registration) and the schema "
             "registry (payloads written against a registered schema, docs/schemas.md)")] = None,
    require_registration: RequireRegistration = False,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "127.0.0.1",
) -> None:
    """Run a gateway alone (run N of them: they share the devices through an MQTT 5 shared subscription
    or an ingest topic's consumer group)."""
    from fieldmesh.runtime.worker import run_gateway

    if not mqtt_url and not ingest_url:
        raise typer.BadParameter("give --mqtt-url and/or --ingest-url")
    _role_logging("gateway")
    _serve_metrics(metrics_port, metrics_host)
    try:
        settings = _settings(bus={"partitions": partitions},
                             **({"gateway": {"require_registration": True}} if require_registration else {}))
        asyncio.run(run_gateway(bus_url=bus_url, mqtt_url=mqtt_url, client_id=client_id, ingest_urls=ingest_url,
                                settings=settings, registry_url=store_url,
                                schemas_url=store_url, lineage_store=store_url))
    except FieldmeshError as exc:
        _fail(exc)


@app.command()
def process(
    bus_url: Annotated[str, typer.Option(help="the bus, e.g. nats://host:4222 or kafka://host:9092")],
    store_url: Annotated[str, typer.Option(help="the hot store, e.g. postgresql://... or sqlite:///path")],
    partitions: Annotated[str | None, typer.Option(help="partitions this replica owns, e.g. 0-3 or 0,2,4")] = None,
    total_partitions: Annotated[int, typer.Option(min=1, max=4096)] = 8,
    group: Annotated[str | None, typer.Option(
        help="consumer group / durable name [default: fm-processor; with --partitions: fm-processor-p<partitions>, "
             "one NATS durable per static replica]")] = None,
    enrich: EnrichOpt = None,
    enrich_db: Annotated[str | None, typer.Option(
        help="PostgreSQL database of the --enrich tables (names their CDC topics)")] = None,
    rules: RulesOpt = None,
    features: FeaturesOpt = None,
    online_url: OnlineUrlOpt = None,
    products: ProductsOpt = None,
    lineage_url: LineageUrlOpt = None,
    retry_for: Annotated[float, typer.Option(
        min=0, help="keep retrying an unreachable bus or store (with backoff) for this many seconds")] = 120.0,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "127.0.0.1",
    lake: Annotated[bool, typer.Option(
        "--lake/--no-lake", help="write the lake too (docs/lake.md); several processors, one per --partitions set, "
        "may write one lake")] = False,
    lake_url: Annotated[str | None, typer.Option(
        help="Iceberg catalog (implies --lake): http(s)://... (REST) or sqlite:///... / postgresql://... (SQL); "
             "default: an SQLite catalog under --data-dir [env FIELDMESH__LAKE__URL]")] = None,
    lake_warehouse: Annotated[str | None, typer.Option(
        help="where the lake's data files go (file://, s3://, ...) [env FIELDMESH__LAKE__WAREHOUSE]")] = None,
    lake_commit_interval: Annotated[float | None, typer.Option(
        min=0.01, help="seconds between lake commits at most (default 60) [env FIELDMESH__LAKE__COMMIT_INTERVAL_S]")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="holds the embedded lake (<data dir>/lake) without --lake-url")] = Path(
        ".fieldmesh"),
) -> None:
    """Run a processor alone."""
    from fieldmesh.runtime.worker import run_processor

    owned = _parse_partitions(partitions, total_partitions) if partitions else None
    if group is None:  # a NATS durable has one subject filter: replicas on other partitions need their own
        group = "fm-processor" if partitions is None else f"fm-processor-p{partitions.replace(',', '_')}"
    _role_logging("process")
    _serve_metrics(metrics_port, metrics_host)
    settings = _settings(bus={"partitions": total_partitions}, **_enrich_kw(enrich, enrich_db), **_rules_kw(rules),
                         **_features_kw(features, online_url), **_products_kw(products),
                         **({"lineage": {"url": lineage_url}} if lineage_url else {}),
                         **_process_lake_kw(lake_url, lake_warehouse, lake_commit_interval))
    lake_dir = str(data_dir.resolve()) if lake or lake_url else None
    _with_retries(lambda: asyncio.run(run_processor(bus_url=bus_url, store_url=store_url, partitions=owned,
                                                    group=group, settings=settings, lake_dir=lake_dir)), retry_for)


def _process_lake_kw(url: str | None, warehouse: str | None, interval: float | None) -> dict[str, Any]:
    kw = {k: v for k, v in (("url", url), ("warehouse", warehouse), ("commit_interval_s", interval)) if v is not None}
    return {"lake": kw} if kw else {}


def _serve_metrics(port: int | None, host: str) -> None:
    """Serve the stage metrics of this process (a stand-alone role) for Prometheus to scrape."""
    if port is None:
        return
    from prometheus_client import start_http_server

    import fieldmesh.obs.metrics  # noqa: F401 - registers the stage metrics

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        _fail(ConfigError(f"--metrics-port {port}: {exc}", key="metrics_port"))
    err.print(f"metrics on http://{host}:{port}/metrics")


def _with_retries(run: Any, retry_for: float) -> None:
    """Run a role; restart it after a transient outage (bus or store unreachable) with capped, jittered
    backoff until an outage has lasted ``retry_for`` seconds. Other errors stop it at once."""
    import logging
    import random
    import time

    from fieldmesh.core.errors import BackendUnavailable
    from fieldmesh.runtime.worker import STOP_SIGNALLED

    log = logging.getLogger("fieldmesh.cli")
    outage_since: float | None = None
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            run()
            return
        except BackendUnavailable as exc:
            if STOP_SIGNALLED.is_set():  # stopped while it waited for the bus or store: not started again
                return
            now = time.monotonic()
            if outage_since is None or now - started > 30:  # the first failure, or it ran for a while
                outage_since, attempt = now, 0
            if now - outage_since >= retry_for:
                _fail(exc)
            delay = random.uniform(0.5, 1.0) * min(30.0, 0.5 * 2**attempt)
            attempt += 1
            log.warning("%s; restarting in %.1fs (try %d, giving up after %.0fs of outage)", exc, delay,
                        attempt, retry_for)
            time.sleep(delay)
        except FieldmeshError as exc:
            _fail(exc)


def _features_kw(features: Path | None, online_url: str | None) -> dict[str, Any]:
    """Settings keywords of ``--features``/``--online-url`` (the file is checked here: a bad view stops the start)."""
    if features is None and online_url is None:
        return {}
    kw: dict[str, Any] = {}
    if features is not None:
        from fieldmesh.stream.featureviews import FeatureViewError, load_feature_views

        try:
            load_feature_views(features)
        except FeatureViewError as exc:
            _fail(ConfigError(f"--features {features}: {exc}", key="features.views_file"))
        kw["views_file"] = features.resolve()
    if online_url is not None:
        from fieldmesh.store.features import load_online_store

        try:
            load_online_store(online_url).close()  # a bad URL or a missing extra stops the start
        except FieldmeshError as exc:
            _fail(exc)
        kw["online_url"] = online_url
    return {"features": kw}


def _rules_kw(rules: Path | None) -> dict[str, Any]:
    """Settings keywords of ``--rules`` (the file is read and checked here, so a bad rule stops the start)."""
    if rules is None:
        return {}
    from fieldmesh.stream.alerts import RuleError, rules_from_yaml

    path = rules.resolve()
    try:
        rules_from_yaml(path.read_text())
    except (OSError, RuleError) as exc:
        _fail(ConfigError(f"--rules {rules}: {exc}", key="alerts.rules_file"))
    return {"alerts": {"rules_file": path}}


def _products_kw(products: Path | None) -> dict[str, Any]:
    """Settings keywords of ``--products`` (the file is read and checked here, so a bad product stops the start)."""
    if products is None:
        return {}
    from fieldmesh.stream.canary import CanaryError, canaries_from_yaml
    from fieldmesh.stream.quality import ProductError, products_from_yaml

    path = products.resolve()
    try:
        text = path.read_text()
        products_from_yaml(text)
        canaries_from_yaml(text, beside_products=True)  # declared beside the products (docs/canary.md)
    except (OSError, ProductError, CanaryError) as exc:
        _fail(ConfigError(f"--products {products}: {exc}", key="products.products_file"))
    return {"products": {"products_file": path}}


def _enrich_kw(specs: list[str] | None, database: str | None) -> dict[str, Any]:
    """Settings keywords of ``--enrich`` options (checked here, so the error names the flag)."""
    from fieldmesh.core.settings import parse_enrich_spec

    out: dict[str, Any] = {}
    if specs:
        try:
            out["joins"] = [parse_enrich_spec(s) for s in specs]
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--enrich") from None
    if database:
        out["database"] = database
    return {"enrich": out} if out else {}


def _parse_partitions(spec: str, total: int) -> list[int]:
    out: set[int] = set()
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
    except ValueError:
        raise typer.BadParameter(f"--partitions {spec!r}: use a list like 0,1,2 or a range like 0-3") from None
    bad = sorted(p for p in out if not 0 <= p < total)
    if bad:
        raise typer.BadParameter(f"--partitions {bad} outside 0..{total - 1}")
    return sorted(out)


@app.command()
def api(
    store_url: Annotated[str | None, typer.Option(help="the hot store")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    http_port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option(
        "--host", "--http-host", envvar="FIELDMESH_HTTP_HOST",
        help="address to listen on; beyond loopback it needs authentication configured (docs/security.md)")
    ] = "127.0.0.1",
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    online_url: OnlineUrlOpt = None,
) -> None:
    """Serve the REST API alone over a hot store."""
    import uvicorn

    from fieldmesh.api.app import create_app
    from fieldmesh.runtime.natsserver import port_in_use
    from fieldmesh.runtime.up import check_access

    if port_in_use(http_port, host):
        _fail(FieldmeshError(f"HTTP port {http_port} is already in use: pass --http-port with a free port"))
    url = _store_url(data_dir, store_url)
    if store_url:  # an external store: fail now, naming what to fix, rather than on the first request
        from fieldmesh.store import load_store

        try:
            load_store(url, readonly=True).close()
        except FieldmeshError as exc:
            _fail(exc)
    try:
        access = check_access(url, _settings(data_dir=data_dir),
                              http_host=host, tls_cert=tls_cert, tls_key=tls_key)
    except FieldmeshError as exc:
        _fail(exc)
        return
    err.print(f"API on {'https' if tls_cert else 'http'}://{host}:{http_port}/api/v1 ({access.describe()})")
    _features_kw(None, online_url)  # a bad URL stops the start
    if online_url is None and (data_dir / "features.db").exists():  # the embedded store `up --features` wrote
        online_url = f"sqlite:///{(data_dir / 'features.db').resolve()}"
    lake = _settings(data_dir=data_dir).lake
    api_app = create_app(url, access=access, ca_dir=data_dir / "ca", online_url=online_url,
                         lake=(lake, data_dir) if lake.enabled and _lake_installed() else None)
    api_app.state.provision.start_crl_refresher()
    try:
        uvicorn.run(api_app, host=host, port=http_port, log_level="warning", ssl_certfile=tls_cert,
                    ssl_keyfile=tls_key)
    finally:
        api_app.state.provision.close()


keys_app = typer.Typer(name="keys", no_args_is_help=True,
                       help="API keys: create (shown once), list, revoke (docs/security.md).")
app.add_typer(keys_app, name="keys")
StoreUrl = Annotated[str | None, typer.Option(help="the hot store (default: the data dir's)")]


def _access_store(data_dir: Path, store_url: str | None) -> Any:
    from fieldmesh.store.access import AccessStore

    try:
        return AccessStore(_store_url(data_dir, store_url))
    except FieldmeshError as exc:
        _fail(exc)


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return f"cli:uid{os.getuid()}"


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="viewer (reads), operator (also acts), admin (also manages keys)")],
    groups: Annotated[str | None, typer.Option(
        help="limit the key to these device groups, e.g. plant-1,lab (the device registry says which "
             "devices a group holds; FIELDMESH__ACCESS__GROUPS places the devices it does not hold)")] = None,
    name: Annotated[str | None, typer.Option(help="a label (default: the key id)")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the key and its record as JSON")] = False,
) -> None:
    """Create an API key and print it, this once (only its hash is stored)."""
    store = _access_store(data_dir, store_url)
    group_list = [g.strip() for g in (groups or "").split(",") if g.strip()]
    try:
        key, secret = store.create_key(role=role, groups=group_list, name=name or "", actor=_cli_actor())
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({**key.as_dict(), "key": secret}))
        return
    typer.echo(secret)
    err.print(f"key {key.id} ({key.role}{', groups ' + ','.join(key.groups) if key.groups else ''}) created; "
              "it is shown this once: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    defined = _settings().access.groups
    missing = [g for g in key.groups if g not in defined and not _registry_has_group(data_dir, store_url, g)]
    if missing:
        err.print(f"[yellow]note:[/] no devices are in group(s) {', '.join(missing)} yet: register devices in them "
                  "(fieldmesh devices add ID --groups ...) or define them in FIELDMESH__ACCESS__GROUPS "
                  "(docs/registry.md)")


def _registry_has_group(data_dir: Path, store_url: str | None, group: str) -> bool:
    from fieldmesh.store.registry import DeviceRegistry

    try:
        reg = DeviceRegistry(_store_url(data_dir, store_url))
    except FieldmeshError:
        return False
    try:
        return bool(reg.list(group=group, limit=1))
    finally:
        reg.close()


@keys_app.command("list")
def keys_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the keys as JSON")] = False,
) -> None:
    """List API keys (never their secrets), revoked ones too."""
    from datetime import UTC, datetime

    store = _access_store(data_dir, store_url)
    try:
        keys = store.list_keys()
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([k.as_dict() for k in keys]))
        return
    from rich.table import Table

    def when(ms: int | None) -> str:
        return "" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    t = Table("id", "name", "role", "groups", "created", "by", "revoked")
    for k in keys:
        t.add_row(k.id, k.name, k.role, ",".join(k.groups) or "(all)", when(k.created_ms), k.created_by,
                  when(k.revoked_ms))
    Console().print(t)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="the key's id (fieldmesh keys list)")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Revoke an API key: refused from the next request on."""
    store = _access_store(data_dir, store_url)
    try:
        key = store.revoke_key(key_id, actor=_cli_actor())
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        store.close()
    err.print(f"key {key.id} ({key.name}) revoked")


# Sub-command groups contributed by other stages, registered when their modules are present.
for _name, _module in (("ca", "fieldmesh.cli.ca"), ("cdc", "fieldmesh.cli.cdc"), ("devices", "fieldmesh.cli.devices"),
                       ("edge", "fieldmesh.edge.cli"), ("features", "fieldmesh.cli.features"),
                       ("jobs", "fieldmesh.cli.jobs"), ("lake", "fieldmesh.cli.lake"),
                       ("schemas", "fieldmesh.cli.schemas"), ("grafana", "fieldmesh.cli.grafana"),
                       ("twins", "fieldmesh.cli.twins"), ("products", "fieldmesh.cli.products"),
                       ("canaries", "fieldmesh.cli.canaries"), ("store", "fieldmesh.cli.store")):
    try:
        _sub = importlib.import_module(_module)
    except ImportError:
        continue
    app.add_typer(_sub.app, name=_name)


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except FieldmeshError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
