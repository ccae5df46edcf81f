"""Feature views: what the feature store computes, declared in YAML (pure code, no I/O but reading the file).

A feature view names an entity (``device``: the reading's ``device_id``, or ``enrichment.<field>``: a
field the enrichment joined, such as an asset or a site), the metrics it reads, hopping window sizes
over one ``hop``, the aggregations, how long an online value lives (``ttl``) and how late a reading may
be (``allowed_lateness``)::

    feature_views:
      - name: pump_stats
        entity: device
        metrics: [temperature, pressure]
        windows: [1m, 5m, 1h]
        hop: 1m
        aggregations: [mean, min, max, stddev, count, last, rate]
        ttl: 2h
        allowed_lateness: 30s

Each window of a view ending at one boundary is one :class:`FeatureRow` per entity, holding every
``{metric}__{agg}__{size}`` value (:func:`feature_name`). :func:`load_feature_views` parses and
validates a file; a mistake raises :class:`FeatureViewError` naming the view and the field to fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fieldmesh.core.errors import ConfigError

__all__ = [
    "AGGREGATIONS", "FeatureRow", "FeatureView", "FeatureViewError", "feature_name", "format_duration_ms",
    "load_feature_views", "parse_duration_ms", "parse_feature_view", "parse_feature_views", "views_by_name",
]

#: Feature aggregations and the :mod:`fieldmesh.stream.windows` aggregate computing each.
AGGREGATIONS: Final[Mapping[str, str]] = {
    "mean": "avg", "min": "min", "max": "max", "stddev": "stddev", "count": "count", "last": "last",
    "rate": "rate", "sum": "sum", "first": "first", "stddev_samp": "stddev_samp",
}
_UNITS: Final = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))
_DURATION: Final = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_METRIC: Final = re.compile(r"^[A-Za-z0-9_.\-]+$")
_KEYS: Final = frozenset({"name", "entity", "metrics", "windows", "hop", "aggregations", "ttl", "allowed_lateness"})


class FeatureViewError(ConfigError):
    """A feature view that does not validate; ``view`` and ``field`` name what to fix."""

    def __init__(self, message: str, *, view: str | None = None, field: str | None = None) -> None:
        where = ".".join(p for p in (view, field) if p)
        super().__init__(f"feature view {where}: {message}" if where else f"feature views: {message}")
        self.view = view
        self.field = field


def parse_duration_ms(text: str | int, *, what: str = "duration") -> int:
    """``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``, ``"250ms"`` -> milliseconds (a bare int is seconds)."""
    if isinstance(text, bool):
        raise ValueError(f"{what}: not a duration: {text!r}")
    if isinstance(text, int):
        return text * 1000
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{what}: not a duration (e.g. 30s, 5m, 1h, 1d): {text!r}")
    return int(m.group(1)) * dict(_UNITS)[m.group(2)]


def format_duration_ms(ms: int) -> str:
    """The shortest spelling of ``ms`` in one unit: 30000 -> ``30s``, 300000 -> ``5m``, 3600000 -> ``1h``."""
    for unit, size in _UNITS:
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def feature_name(metric: str, agg: str, size_ms: int) -> str:
    """A feature's name: ``{metric}__{agg}__{size}``, e.g. ``temperature__mean__5m``."""
    return f"{metric}__{agg}__{format_duration_ms(size_ms)}"


@dataclass(frozen=True, slots=True)
class FeatureView:
    """One validated feature view (see the module docstring)."""

    name: str
    entity: str  # "device" or "enrichment.<field>"
    metrics: tuple[str, ...]
    windows_ms: tuple[int, ...]  # ascending, each a multiple of hop_ms
    hop_ms: int
    aggregations: tuple[str, ...]  # feature names (mean, ...), see AGGREGATIONS
    ttl_ms: int
    allowed_lateness_ms: int = 0

    @property
    def entity_field(self) -> str | None:
        """The enriched field keying the view, None for ``device``."""
        return None if self.entity == "device" else self.entity.removeprefix("enrichment.")

    @property
    def window_aggregates(self) -> tuple[str, ...]:
        """The :mod:`fieldmesh.stream.windows` aggregates the view needs."""
        return tuple(dict.fromkeys(AGGREGATIONS[a] for a in self.aggregations))

    def feature_names(self) -> list[str]:
        """Every feature of the view, in (size, metric, aggregation) order."""
        return [feature_name(m, a, s) for s in self.windows_ms for m in self.metrics for a in self.aggregations]


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """The features of one view for one entity at one window end (the online and offline unit).

    ``window_start_ms`` is the start of the view's largest window; ``known_at_ms`` the gateway arrival
    time of the reading whose processing emitted the row; ``version`` 0 for a first emission, higher for
    a re-emission of the same window. A feature absent from ``values`` had no reading in its window.
    """

    view: str
    entity: str
    window_start_ms: int
    window_end_ms: int
    known_at_ms: int
    version: int
    values: dict[str, float] = field(default_factory=dict)


def _str_list(view: str, key: str, raw: Any, *, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise FeatureViewError("must be a non-empty list", view=view, field=key)
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not item or (pattern is not None and not pattern.match(item)):
            raise FeatureViewError(f"invalid entry {item!r}", view=view, field=key)
        if item in out:
            raise FeatureViewError(f"{item!r} listed twice", view=view, field=key)
        out.append(item)
    return tuple(out)


def _duration(view: str, key: str, raw: Any, *, zero_ok: bool = False) -> int:
    try:
        ms = parse_duration_ms(raw, what=key)
    except (ValueError, TypeError) as exc:
        raise FeatureViewError(f"not a duration (e.g. 30s, 5m, 1h, 1d): {raw!r}", view=view, field=key) from exc
    if ms < 0 or (ms == 0 and not zero_ok):
        raise FeatureViewError(f"must be {'>= 0' if zero_ok else 'positive'}: {raw!r}", view=view, field=key)
    return ms


def parse_feature_view(raw: Any, *, index: int = 0) -> FeatureView:
    """One view from its mapping (as in the YAML file)."""
    if not isinstance(raw, dict):
        raise FeatureViewError(f"entry {index} is not a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise FeatureViewError(f"entry {index}: name must be an identifier (letters, digits, _), got {name!r}",
                               field="name")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise FeatureViewError(f"unknown key(s) {unknown}; known: {sorted(_KEYS)}", view=name, field=unknown[0])
    for key in ("entity", "metrics", "windows", "hop", "aggregations", "ttl"):
        if key not in raw:
            raise FeatureViewError("missing", view=name, field=key)
    entity = raw["entity"]
    if not isinstance(entity, str) or not (
            entity == "device" or (entity.startswith("enrichment.") and len(entity) > len("enrichment."))):
        raise FeatureViewError(f"must be 'device' or 'enrichment.<field>', got {entity!r}", view=name, field="entity")
    metrics = _str_list(name, "metrics", raw["metrics"], pattern=_METRIC)
    aggs = _str_list(name, "aggregations", raw["aggregations"])
    for a in aggs:
        if a not in AGGREGATIONS:
            raise FeatureViewError(f"unknown aggregation {a!r}; known: {sorted(AGGREGATIONS)}", view=name,
                                   field="aggregations")
    hop = _duration(name, "hop", raw["hop"])
    wins = raw["windows"]
    if isinstance(wins, str | int):
        wins = [wins]
    if not isinstance(wins, list) or not wins:
        raise FeatureViewError("must be a non-empty list of durations", view=name, field="windows")
    sizes: list[int] = []
    for w in wins:
        size = _duration(name, "windows", w)
        if size % hop:
            raise FeatureViewError(f"{w!r} is not a multiple of hop {raw['hop']!r}", view=name, field="windows")
        if size in sizes:
            raise FeatureViewError(f"{w!r} listed twice", view=name, field="windows")
        sizes.append(size)
    ttl = _duration(name, "ttl", raw["ttl"])
    lateness = _duration(name, "allowed_lateness", raw.get("allowed_lateness", 0), zero_ok=True)
    return FeatureView(name=name, entity=entity, metrics=metrics, windows_ms=tuple(sorted(sizes)), hop_ms=hop,
                       aggregations=aggs, ttl_ms=ttl, allowed_lateness_ms=lateness)


def parse_feature_views(data: Any) -> list[FeatureView]:
    """Views from the parsed YAML: ``{"feature_views": [...]}`` or the list itself."""
    if isinstance(data, dict):
        if set(data) != {"feature_views"}:
            raise FeatureViewError(f"expected one key 'feature_views', got {sorted(data)}", field="feature_views")
        data = data["feature_views"]
    if not isinstance(data, list) or not data:
        raise FeatureViewError("'feature_views' must be a non-empty list", field="feature_views")
    views = [parse_feature_view(v, index=i) for i, v in enumerate(data)]
    seen: set[str] = set()
    for v in views:
        if v.name in seen:
            raise FeatureViewError("name used by two views", view=v.name, field="name")
        seen.add(v.name)
    return views


def load_feature_views(path: str | Path) -> list[FeatureView]:
    """Parse and validate a feature views YAML file (:class:`FeatureViewError` names what to fix)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise FeatureViewError(f"cannot read {p}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FeatureViewError(f"{p} is not YAML: {exc}") from exc
    return parse_feature_views(data)


def views_by_name(views: Sequence[FeatureView]) -> dict[str, FeatureView]:
    """``{view.name: view}``."""
    return {v.name: v for v in views}
