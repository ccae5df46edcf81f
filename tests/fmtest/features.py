"""An oracle for feature rows (docs/features.md), from first principles: de-duplication by identity, per-entity
watermarks, hopping windows, exact aggregates with ``fractions.Fraction`` (stddev: an 80-digit Decimal root)."""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from fieldmesh.stream.featureviews import FeatureView, format_duration_ms
from fmtest import oracle


def sqrt_exact(x: Fraction) -> float:
    with localcontext() as ctx:
        ctx.prec = 80
        return float((Decimal(x.numerator) / Decimal(x.denominator)).sqrt())


def features_oracle(stream: list[tuple[str, dict[str, Any]]],
                    view: FeatureView) -> dict[tuple[str, int], dict[str, Any]]:
    """{(entity, window_end): {"start", "known_at", "values"}} from first principles."""
    seen: set[tuple[Any, ...]] = set()
    newest: dict[str, int] = {}
    emitted: dict[tuple[str, int], int] = {}  # (entity, end) -> known_at
    members: dict[tuple[str, int, int, str], list[tuple[int, float]]] = defaultdict(list)  # (ent, size, end, m)
    hop, late = view.hop_ms, view.allowed_lateness_ms
    field = view.entity_field
    for dev, r in stream:
        key = oracle.identity(dev, r)
        if key in seen:
            continue
        seen.add(key)
        ent = dev if field is None else r[field]
        ts = r["ts"]
        old = newest.get(ent)
        newest[ent] = ts if old is None else max(old, ts)
        for size in view.windows_ms:  # the windows the reading falls in, still open when it arrives
            first_end = (ts // hop + 1) * hop
            for end in range(first_end, first_end + size, hop):
                if (ent, end) in emitted or (old is not None and old - late >= end):
                    continue
                for m, v in r["measurements"].items():
                    if m in view.metrics:
                        members[(ent, size, end, m)].append((ts, float(v)))
        wm = newest[ent] - late
        for (e, _size, end, _m) in list(members):  # windows this reading made final
            if e == ent and end <= wm and (ent, end) not in emitted:
                emitted[(ent, end)] = r["received"]
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for (ent, size, end, m), vals in members.items():
        if (ent, end) not in emitted:
            continue
        row = out.setdefault((ent, end), {"start": end - size, "known_at": emitted[(ent, end)], "values": {}})
        row["start"] = min(row["start"], end - size)
        n = len(vals)
        s = sum(Fraction(v) for _, v in vals)
        q = sum(Fraction(v) ** 2 for _, v in vals)
        first = min(vals, key=lambda x: (x[0], x[1]))
        last = max(vals, key=lambda x: (x[0], x[1]))
        agg = {"mean": float(s / n), "min": min(v for _, v in vals), "max": max(v for _, v in vals),
               "stddev": sqrt_exact(q / n - (s / n) ** 2), "count": float(n), "last": last[1],
               "rate": math.nan if last[0] == first[0] else float(
                   (Fraction(last[1]) - Fraction(first[1])) * 1000 / (last[0] - first[0])),
               "sum": float(s), "first": first[1]}
        for a in view.aggregations:
            row["values"][f"{m}__{a}__{format_duration_ms(size)}"] = agg[a]
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def check_rows(rows: list[Any], expected: dict[tuple[str, int], dict[str, Any]]) -> None:
    got = {(r.entity, r.window_end_ms): r for r in rows}
    assert len(got) == len(rows), "a feature row was written twice"
    assert set(got) == set(expected)
    for k, e in expected.items():
        g = got[k]
        assert (g.window_start_ms, g.known_at_ms, g.version) == (e["start"], e["known_at"], 0), k
        assert set(g.values) == set(e["values"]), k
        bad = {f: (g.values[f], v) for f, v in e["values"].items() if not same(g.values[f], v)}
        assert not bad, (k, bad)
