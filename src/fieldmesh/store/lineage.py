"""OpenLineage run events kept in the hot store (``lineage_events``), and the graph they describe.

One row per event: when, its type (START, RUNNING, COMPLETE, FAIL), the job, the run id and the
event's JSON as sent. :meth:`LineageTables.graph` joins the newest event of each job into edges
``input dataset -> job -> output dataset`` and walks them from a dataset, up and down stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fieldmesh.store.access import HotTables

__all__ = ["LineageTables"]

_COMMON_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS lineage_events (id {pk}, event_time_ms {int} NOT NULL, event_type TEXT NOT NULL,"
    " job_namespace TEXT NOT NULL, job_name TEXT NOT NULL, run_id TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS lineage_events_job ON lineage_events (job_namespace, job_name, id)",
)
SQLITE_DDL: Final = tuple(s.format(int="INTEGER", pk="INTEGER PRIMARY KEY AUTOINCREMENT") for s in _COMMON_DDL)
PG_DDL: Final = tuple(s.format(int="BIGINT", pk="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
                      for s in _COMMON_DDL)
#: Events kept per job; older ones are deleted as new ones come.
KEEP_PER_JOB: Final = 10_000


def dataset_key(d: Mapping[str, Any]) -> str:
    """``namespace/name`` of an OpenLineage dataset."""
    return f"{d['namespace']}/{d['name']}"


class LineageTables(HotTables):
    """The local copy of every lineage event, for the API and the emitters."""

    SQLITE_DDL = SQLITE_DDL
    PG_DDL = PG_DDL
    APP_NAME = "fieldmesh-lineage"
    WHAT = "lineage events"

    def keep(self, event: Mapping[str, Any], *, event_time_ms: int) -> None:
        """Keep one event (its JSON shape) and trim its job's oldest beyond :data:`KEEP_PER_JOB`."""
        job = event["job"]
        with self._tx() as con:
            con.execute(self._sql("INSERT INTO lineage_events (event_time_ms, event_type, job_namespace, job_name,"
                                  " run_id, body) VALUES (?, ?, ?, ?, ?, ?)"),
                        (event_time_ms, event.get("eventType", ""), job["namespace"], job["name"],
                         event["run"]["runId"], json.dumps(event, sort_keys=True)))
            con.execute(self._sql("DELETE FROM lineage_events WHERE job_namespace = ? AND job_name = ? AND id <="
                                  " (SELECT max(id) FROM lineage_events WHERE job_namespace = ? AND job_name = ?) - ?"),
                        (job["namespace"], job["name"], job["namespace"], job["name"], KEEP_PER_JOB))

    def events(self, *, job: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest events first (of jobs named ``job`` when given)."""
        if job is None:
            rows = self._fetch("SELECT body FROM lineage_events ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._fetch("SELECT body FROM lineage_events WHERE job_name = ? ORDER BY id DESC LIMIT ?",
                               (job, limit))
        return [json.loads(r[0]) for r in rows]

    def latest_by_job(self) -> list[dict[str, Any]]:
        """The newest START or RUNNING event of each job (those name the job's datasets)."""
        rows = self._fetch("SELECT body FROM lineage_events WHERE id IN (SELECT max(id) FROM lineage_events"
                           " WHERE event_type IN ('START', 'RUNNING') GROUP BY job_namespace, job_name)")
        return [json.loads(r[0]) for r in rows]

    def graph(self, dataset: str | None = None, *, extra_edges: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """Nodes and edges of the lineage graph; with ``dataset`` (``namespace/name`` or a name), only what
        is up or down stream of it. ``extra_edges``: dataset -> dataset edges known otherwise (devices)."""
        nodes: dict[str, dict[str, Any]] = {}
        edges: set[tuple[str, str]] = set()
        for ev in self.latest_by_job():
            job = f"job:{ev['job']['namespace']}/{ev['job']['name']}"
            nodes[job] = {"id": job, "kind": "job", "namespace": ev["job"]["namespace"], "name": ev["job"]["name"],
                          "state": ev.get("eventType"), "run_id": ev["run"]["runId"], "at": ev.get("eventTime")}
            for side, kind in (("inputs", "in"), ("outputs", "out")):
                for d in ev.get(side, []):
                    key = dataset_key(d)
                    node = nodes.setdefault(key, {"id": key, "kind": "dataset", "namespace": d["namespace"],
                                                  "name": d["name"], "facets": {}})
                    node["facets"].update(d.get("facets") or {})
                    node["facets"].update(d.get("outputFacets") or {})
                    node["facets"].update(d.get("inputFacets") or {})
                    edges.add((key, job) if kind == "in" else (job, key))
        for a, b in extra_edges:
            for k in (a, b):
                if k.startswith("device:"):
                    nodes.setdefault(k, {"id": k, "kind": "device", "name": k[len("device:"):]})
                else:
                    ns, _, name = k.partition("/")
                    nodes.setdefault(k, {"id": k, "kind": "dataset", "namespace": ns, "name": name, "facets": {}})
            edges.add((a, b))
        if dataset is not None:
            start = {k for k, n in nodes.items() if k == dataset or (n["kind"] == "dataset" and n["name"] == dataset)}
            keep = set(start)
            for forward in (True, False):
                todo = list(start)
                while todo:
                    at = todo.pop()
                    for a, b in edges:
                        nxt = b if forward and a == at else a if not forward and b == at else None
                        if nxt is not None and nxt not in keep:
                            keep.add(nxt)
                            todo.append(nxt)
            nodes = {k: v for k, v in nodes.items() if k in keep}
            edges = {(a, b) for a, b in edges if a in keep and b in keep}
        return {"nodes": sorted(nodes.values(), key=lambda n: n["id"]),
                "edges": [{"from": a, "to": b} for a, b in sorted(edges)]}
