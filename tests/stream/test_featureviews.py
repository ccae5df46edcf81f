"""Feature views: parsing, validation (errors name the field), feature names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldmesh.core.errors import ConfigError
from fieldmesh.stream.featureviews import (
    FeatureViewError,
    feature_name,
    format_duration_ms,
    load_feature_views,
    parse_feature_views,
)

GOOD = """
feature_views:
  - name: pump_stats
    entity: device
    metrics: [temperature, pressure]
    windows: [5m, 1m, 1h]
    hop: 1m
    aggregations: [mean, min, max, stddev, count, last, rate]
    ttl: 2h
    allowed_lateness: 30s
  - name: site_temp
    entity: enrichment.site
    metrics: temperature
    windows: [30s]
    hop: 30s
    aggregations: [mean]
    ttl: 10m
"""


def test_load_good_file(tmp_path: Path) -> None:
    f = tmp_path / "views.yaml"
    f.write_text(GOOD)
    pump, site = load_feature_views(f)
    assert pump.name == "pump_stats" and pump.entity_field is None
    assert pump.windows_ms == (60_000, 300_000, 3_600_000)
    assert pump.hop_ms == 60_000 and pump.ttl_ms == 7_200_000 and pump.allowed_lateness_ms == 30_000
    assert pump.window_aggregates == ("avg", "min", "max", "stddev", "count", "last", "rate")
    assert len(pump.feature_names()) == 3 * 2 * 7
    assert "temperature__mean__5m" in pump.feature_names()
    assert site.entity_field == "site" and site.metrics == ("temperature",) and site.allowed_lateness_ms == 0
    assert site.feature_names() == ["temperature__mean__30s"]


def test_feature_names() -> None:
    assert feature_name("temperature", "mean", 300_000) == "temperature__mean__5m"
    assert feature_name("p", "max", 3_600_000) == "p__max__1h"
    assert feature_name("p", "max", 86_400_000) == "p__max__1d"
    assert feature_name("p", "max", 30_000) == "p__max__30s"
    assert format_duration_ms(90_000) == "90s"
    assert format_duration_ms(1500) == "1500ms"


def _one(**over: object) -> dict[str, object]:
    view: dict[str, object] = {"name": "v", "entity": "device", "metrics": ["t"], "windows": ["1m"], "hop": "1m",
                               "aggregations": ["mean"], "ttl": "1h"}
    view.update(over)
    return {"feature_views": [view]}


@pytest.mark.parametrize(("over", "field"), [
    ({"entity": "asset"}, "entity"),
    ({"windows": ["90s"]}, "windows"),
    ({"windows": ["1m", "1m"]}, "windows"),
    ({"windows": ["soon"]}, "windows"),
    ({"hop": "0s"}, "hop"),
    ({"aggregations": ["median"]}, "aggregations"),
    ({"metrics": []}, "metrics"),
    ({"ttl": "forever"}, "ttl"),
    ({"allowed_lateness": "-1s"}, "allowed_lateness"),
    ({"colour": "red"}, "colour"),
    ({"name": "has space"}, "name"),
])
def test_errors_name_the_field(over: dict[str, object], field: str) -> None:
    with pytest.raises(FeatureViewError) as exc:
        parse_feature_views(_one(**over))
    assert exc.value.field == field
    assert field in str(exc.value)
    assert isinstance(exc.value, ConfigError)


def test_missing_field_and_duplicate_names() -> None:
    raw = _one()
    del raw["feature_views"][0]["ttl"]  # type: ignore[index]
    with pytest.raises(FeatureViewError, match=r"v\.ttl: missing"):
        parse_feature_views(raw)
    v = _one()["feature_views"]
    with pytest.raises(FeatureViewError, match="two views"):
        parse_feature_views({"feature_views": [*v, *v]})  # type: ignore[misc]
    with pytest.raises(FeatureViewError, match="feature_views"):
        parse_feature_views({"views": []})


def test_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FeatureViewError, match="cannot read"):
        load_feature_views(tmp_path / "absent.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("feature_views: [\n")
    with pytest.raises(FeatureViewError, match="not YAML"):
        load_feature_views(f)
