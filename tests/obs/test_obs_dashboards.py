"""The shipped Grafana dashboards and Prometheus rules: valid shapes, in the package, written by
``fieldmesh grafana export``. (That every metric they name is served: tests/obs/test_metrics_up.py and
tests/edge/test_edge_metrics.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldmesh.obs.dashboards import DASHBOARDS, RULES, read

_PANEL_TYPES = {"timeseries", "stat", "bargauge", "gauge", "table", "heatmap", "text"}


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboards_have_grafanas_shape(name: str) -> None:
    d: dict[str, Any] = json.loads(read(name))
    assert isinstance(d["uid"], str) and re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert d["title"].startswith("fieldmesh / ")
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert {"from", "to"} <= set(d["time"])
    (ds,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    panels = d["panels"]
    assert len(panels) >= 4
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in _PANEL_TYPES, p
        assert p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (mine & cells), f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"]["uid"] == "${" + ds["name"] + "}"
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert "fieldmesh_" in t["expr"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_the_rules_file_has_prometheus_shape() -> None:
    doc = yaml.safe_load(read(RULES))
    names = set()
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
            assert "fieldmesh_" in r["expr"] and r["expr"].count("(") == r["expr"].count(")")
            if "record" in r:
                assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"])
            else:
                assert r["labels"]["severity"] in {"info", "warning", "minor", "major", "critical"}
                assert r["annotations"]["summary"]
            names.add(r.get("alert") or r["record"])
    assert {"FieldmeshSloBreached", "FieldmeshEdgeDropping", "fieldmesh:event_to_stored_seconds:p99_5m"} <= names


def test_grafana_export_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "out" / "grafana"
    r = subprocess.run([sys.executable, "-m", "fieldmesh", "grafana", "export", "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*DASHBOARDS, RULES])
    for name in (*DASHBOARDS, RULES):
        assert (out / name).read_text() == read(name)
    assert r.stdout.split() == [str(out / n) for n in (*DASHBOARDS, RULES)]


def test_the_files_are_package_data() -> None:
    """The wheel takes every file under src/fieldmesh (hatchling): nothing excludes these."""
    import tomllib

    here = Path(__file__).resolve().parents[2]
    cfg = tomllib.loads((here / "pyproject.toml").read_text())
    wheel = cfg["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["src/fieldmesh"] and not wheel.get("exclude")
    src = here / "src" / "fieldmesh" / "obs" / "dashboards"
    assert all((src / n).is_file() for n in (*DASHBOARDS, RULES))
    ignored = subprocess.run(["git", "check-ignore", *[str(src / n) for n in (*DASHBOARDS, RULES)]],
                             capture_output=True, text=True, cwd=here)
    assert ignored.stdout == ""
