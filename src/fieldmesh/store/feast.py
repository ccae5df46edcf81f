"""A Feast repository over our offline features (docs/features.md, "Feast").

Writes, in one directory: ``feature_store.yaml`` (local provider, ``file`` offline store, SQLite online
store), ``data/<view>.parquet`` per view, and ``features.py`` with one ``Entity`` per entity kind and one
``FileSource`` + ``FeatureView`` per view (features as ``Float64`` fields, the view's TTL).

Feast's point-in-time join takes, per entity row, the latest source row with ``event_timestamp <= ts``
and drops it when older than the TTL. Our rule is "the largest (window_end, version) among rows known at
ts". The two agree when the exported rows are the *steps* of our answer
(:meth:`~fieldmesh.stream.pointintime.AsOfIndex.steps`): one row each time the answer for an entity
changed, stamped with the ``known_at`` at which it changed. So the export never leaks a value before it
was known, and Feast's TTL counts from the same instant as ours.
"""

from __future__ import annotations

import keyword
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fieldmesh.core.errors import ConfigError
from fieldmesh.stream.pointintime import AsOfIndex, FeatureRows

if TYPE_CHECKING:
    import pyarrow as pa

    from fieldmesh.stream.featureviews import FeatureView

__all__ = ["entity_join_key", "export_feast_repo", "feast_rows"]


def entity_join_key(view: FeatureView) -> tuple[str, str]:
    """The Feast entity name and join key of a view: ``device``/``device_id``, or the enriched field."""
    field = view.entity_field
    return ("device", "device_id") if field is None else (field.replace(".", "_"), field.replace(".", "_"))


def feast_rows(view: FeatureView, rows: FeatureRows) -> pa.Table:
    """The view's steps as a Feast source: join key, ``event_timestamp`` (known_at), ``window_end``, features."""
    import pyarrow as pa

    steps = AsOfIndex(rows).steps()
    r = rows.take(steps)
    order = np.lexsort((r.known_at_ms, r.entity.astype(str)))
    r = r.take(order)
    _, key = entity_join_key(view)
    ts = pa.timestamp("ms", tz="UTC")
    cols: dict[str, Any] = {
        key: pa.array(r.entity.tolist(), pa.string()),
        "event_timestamp": pa.array(r.known_at_ms, pa.int64()).cast(ts),
        "window_end": pa.array(r.window_end_ms, pa.int64()).cast(ts),
    }
    for j, name in enumerate(r.names):
        cols[name] = pa.array(r.values[:, j], pa.float64(), mask=~r.present[:, j] | np.isnan(r.values[:, j]))
    return pa.table(cols)


def _ident(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    if not out or out[0].isdigit() or keyword.iskeyword(out):
        out = "_" + out
    return out


_YAML = """\
# Written by `fieldmesh features feast-export`: a local Feast repository over fieldmesh's offline features.
project: {project}
provider: local
registry: data/registry.db
offline_store:
  type: file
online_store:
  type: sqlite
  path: data/online_store.db
entity_key_serialization_version: 3
"""


def _repo_py(views: Sequence[FeatureView], files: Mapping[str, str]) -> str:
    lines = [
        '"""Feature definitions over fieldmesh\'s offline features (written by `fieldmesh features feast-export`).',
        "",
        "Each source row is one step of fieldmesh's point-in-time answer: event_timestamp is when the row became",
        "known (known_at), so Feast's as-of join returns exactly what fieldmesh's training sets do.",
        '"""',
        "",
        "from datetime import timedelta",
        "from pathlib import Path",
        "",
        "from feast import Entity, FeatureView, Field, FileSource",
        "from feast.types import Float64",
        "from feast.value_type import ValueType",
        "",
        "HERE = Path(__file__).resolve().parent",
        "",
    ]
    entities: dict[str, str] = {}
    for v in views:
        name, key = entity_join_key(v)
        if name not in entities:
            entities[name] = _ident(name)
            lines.append(f"{entities[name]} = Entity(name={name!r}, join_keys=[{key!r}], "
                         f"value_type=ValueType.STRING, description={v.entity!r})")
    lines.append("")
    for v in views:
        src, ent = _ident(f"{v.name}_source"), entities[entity_join_key(v)[0]]
        lines += [
            "",
            f"{src} = FileSource(",
            f"    name={v.name + '_source'!r},",
            f"    path=str(HERE / {files[v.name]!r}),",
            '    timestamp_field="event_timestamp",',
            ")",
            f"{_ident(v.name)} = FeatureView(",
            f"    name={v.name!r},",
            f"    entities=[{ent}],",
            f"    ttl=timedelta(milliseconds={v.ttl_ms}),",
            "    schema=[",
            *[f"        Field(name={n!r}, dtype=Float64)," for n in v.feature_names()],
            "    ],",
            f"    source={src},",
            "    online=False,",
            f"    tags={{'fieldmesh_entity': {v.entity!r}, 'hop_ms': '{v.hop_ms}'}},",
            ")",
        ]
    return "\n".join(lines) + "\n"


def export_feast_repo(out: Path, views: Sequence[FeatureView], rows: Mapping[str, FeatureRows], *,
                      project: str = "fieldmesh") -> dict[Path, int | None]:
    """Write the Feast repository into ``out``; return the files written (with row counts for data files).

    Raises:
        ConfigError: a project name Feast refuses, or a view without rows given.
    """
    import pyarrow.parquet as pq

    if not project.replace("_", "").isalnum() or not project[0].isalpha():
        raise ConfigError(f"Feast project {project!r}: letters, digits and _ only, starting with a letter",
                          key="project")
    missing = [v.name for v in views if v.name not in rows]
    if missing:
        raise ConfigError(f"no feature rows given for view(s) {missing}")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    written: dict[Path, int | None] = {}
    files: dict[str, str] = {}
    for v in views:
        table = feast_rows(v, rows[v.name])
        rel = f"data/{v.name}.parquet"
        pq.write_table(table, out / rel)
        files[v.name] = rel
        written[out / rel] = table.num_rows
    (out / "feature_store.yaml").write_text(_YAML.format(project=project))
    written[out / "feature_store.yaml"] = None
    (out / "features.py").write_text(_repo_py(views, files))
    written[out / "features.py"] = None
    return written
