"""The Grafana dashboards and the Prometheus rules fieldmesh ships (package data beside this module).

``fieldmesh grafana export --out DIR`` writes them (:func:`export`); docs/observability.md, "Dashboards".
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Final

__all__ = ["DASHBOARDS", "RULES", "export", "read"]

#: The dashboards, by file name: pipeline health, fleet freshness, DLQ, edge.
DASHBOARDS: Final = ("pipeline-health.json", "fleet-freshness.json", "dlq.json", "edge.json")
#: The Prometheus rules file (recording rules and alerts).
RULES: Final = "fieldmesh-rules.yaml"


def read(name: str) -> str:
    """The text of one shipped file (a name of :data:`DASHBOARDS` or :data:`RULES`)."""
    if name not in (*DASHBOARDS, RULES):
        raise ValueError(f"no shipped file {name!r}: one of {[*DASHBOARDS, RULES]}")
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def export(out: Path) -> list[Path]:
    """Write every dashboard and the rules file into ``out`` (created if missing); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (*DASHBOARDS, RULES):
        path = out / name
        path.write_text(read(name), encoding="utf-8")
        written.append(path)
    return written
