"""The package layout is a contract: stages use a bus only through ``bus/base.py``, and only ``store/``
runs SQL on the hot store's tables.

Parses every module under ``src/fieldmesh`` (no import, no server) and names each reach it finds.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fieldmesh"

#: Members of the adapters (NatsBus, KafkaBus, their consumers, nats-py, confluent-kafka) that are not
#: in the contract: a stage that needs one is missing a method in ``bus/base.py``.
BUS_PRIVATE = frozenset({
    "js", "nc", "admin", "brokers", "raw_pending", "raw_consumer", "ensure_stream", "stream_info",
    "consumer_info", "delete_consumer", "purge_stream", "fetch_raw", "commit_async", "commit_sync",
    "apply_owned", "assignment", "producer_config", "consumer_config", "pull_subscribe_bind",
})
#: The adapters and their client libraries: imported by ``bus/`` alone.
BUS_MODULES = ("fieldmesh.bus.nats", "fieldmesh.bus.kafka", "nats", "confluent_kafka")
#: JetStream stream names of fieldmesh's own topics: stages name topics (``core/topics.py``).
STREAM_NAME = re.compile(r"^FM_(INGEST|READINGS|DLQ|CDC)(_|$)")
#: Parameters that hold a bus: typed ``Bus`` (or a Consumer), never ``Any``.
BUS_PARAMS = frozenset({"bus", "door", "_bus"})
#: Folders that are not stages: the adapters themselves, and the edge agent (its own NATS uplink,
#: a device-side client with no fieldmesh bus).
BUS_EXEMPT = ("bus/", "edge/")

STORE_TABLES = ("counters", "device_certificates", "device_metrics", "device_registry", "device_registry_groups",
                "device_registry_version", "devices", "dlq", "idents", "idents_blocks", "idents_recent", "meta",
                "positions", "reading_keys", "readings", "rollup_1h", "rollup_1m", "watermarks")
SQL_ON_TABLE = re.compile(
    r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s+\"?(" + "|".join(STORE_TABLES) + r")\b\"?", re.IGNORECASE)
#: SQL on store tables outside ``store/`` that is allowed, by file and table.
SQL_ALLOWED = {
    # ``fieldmesh query``: the user's SQL over the store, a documented contract; its help names tables
    "cli/main.py": {"*"},
}


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        out.append((rel, ast.parse(path.read_text(), filename=str(path))))
    assert len(out) > 30, f"found only {len(out)} modules under {SRC}"
    return out


def _bus_reaches(rel: str, tree: ast.Module) -> list[str]:
    found: list[str] = []

    def at(node: ast.AST, what: str) -> None:
        found.append(f"{rel}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BUS_PRIVATE:
            at(node, f".{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            target = ast.unparse(node.args[0]) if node.args else ""
            name = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else None
            if re.search(r"bus|consumer|door", target, re.IGNORECASE) or name in BUS_PRIVATE:
                at(node, f"{node.func.id}({ast.unparse(node.args[0])}, {name!r})")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(BUS_MODULES):
                    at(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith(BUS_MODULES):
                at(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and STREAM_NAME.match(node.value):
            at(node, f"stream name {node.value!r}")
        elif isinstance(node, ast.arg) and node.arg in BUS_PARAMS and node.annotation is not None:
            if ast.unparse(node.annotation) == "Any":
                at(node, f"{node.arg}: Any")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute | ast.Name):
            name = node.target.attr if isinstance(node.target, ast.Attribute) else node.target.id
            if name in BUS_PARAMS and ast.unparse(node.annotation) == "Any":
                at(node, f"{name}: Any")
    return found


def _sql_reaches(rel: str, tree: ast.Module) -> dict[str, list[str]]:
    """{table: [where]} for string constants that run SQL on a store table."""
    found: dict[str, list[str]] = {}
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)  # prose ("decode ... into readings"), not SQL
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for m in SQL_ON_TABLE.finditer(node.value):
                found.setdefault(m.group(2).lower(), []).append(f"{rel}:{node.lineno}: {m.group(0)!r}")
    return found


def test_no_stage_reaches_past_the_bus_contract() -> None:
    reaches = [r for rel, tree in _modules() if not rel.startswith(BUS_EXEMPT) for r in _bus_reaches(rel, tree)]
    assert not reaches, "stages reach past bus/base.py (add a method to the Bus/Consumer contract):\n" + "\n".join(
        reaches)


def test_only_the_store_runs_sql_on_its_tables() -> None:
    reaches: list[str] = []
    for rel, tree in _modules():
        if rel.startswith("store/"):
            continue
        found = _sql_reaches(rel, tree)
        allowed = SQL_ALLOWED.get(rel, set())
        reaches += [w for table, where in found.items() if table not in allowed and "*" not in allowed for w in where]
    assert not reaches, "SQL on store tables outside store/ (add a store method):\n" + "\n".join(reaches)


def test_the_checks_see_what_they_forbid() -> None:
    """Each rule catches an example of what it forbids (else a rule could silently match nothing)."""
    bad = ast.parse(
        "import nats.js.errors\n"
        "from fieldmesh.bus.nats import stream_name\n"
        "async def f(bus: Any, consumer) -> None:\n"
        "    await bus.js.purge_stream('FM_INGEST', seq=1)\n"
        "    owned = getattr(consumer, 'apply_owned', None)\n"
        "    n = await bus.raw_pending(stream_name('fm.readings'), 'g')\n"
    )
    reaches = "\n".join(_bus_reaches("x.py", bad))
    for what in ("import nats.js.errors", "from fieldmesh.bus.nats", "bus: Any", ".js", ".purge_stream",
                 "'FM_INGEST'", "getattr(consumer, 'apply_owned')", ".raw_pending"):
        assert what in reaches, (what, reaches)
    sql = _sql_reaches("x.py", ast.parse('q = "SELECT count(*) FROM devices"\nr = "INSERT INTO readings VALUES"'))
    assert set(sql) == {"devices", "readings"}
    good = ast.parse("async def f(bus: Bus) -> None:\n    await bus.pending('fm.readings', group='g')\n")
    assert _bus_reaches("x.py", good) == []
