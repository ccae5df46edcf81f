"""An oracle for stored readings and rollups, written from docs/contract.md alone.

It shares no code with fieldmesh: identity, windows and sums are computed here from first
principles (``math.fsum`` for sums, ``fractions.Fraction`` for averages).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from fractions import Fraction
from typing import Any

WINDOWS = {"1m": 60_000, "1h": 3_600_000}


def identity(device_id: str, r: dict[str, Any]) -> tuple[Any, ...]:
    """docs/contract.md: event_id, else (device_id, boot_id, seq), else (device_id, ts, measurements)."""
    if r.get("event_id") is not None:
        return ("e", device_id, r["event_id"])
    if r.get("seq") is not None:
        return ("s", device_id, r.get("boot_id") or "", r["seq"])
    return ("m", device_id, r["ts"], json.dumps(r["measurements"], sort_keys=True))


def unique_readings(sent: list[tuple[str, dict[str, Any]]]) -> dict[tuple[Any, ...], tuple[str, dict[str, Any]]]:
    """First reading of each identity."""
    out: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    for dev, r in sent:
        out.setdefault(identity(dev, r), (dev, r))
    return out


def rollups(sent: list[tuple[str, dict[str, Any]]], interval: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Expected rollup rows keyed by (device, metric, window_start_ms)."""
    size = WINDOWS[interval]
    vals: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for dev, r in unique_readings(sent).values():
        ws = r["ts"] // size * size
        for name, v in r["measurements"].items():
            vals[(dev, name, ws)].append(float(v))
    out = {}
    for k, vs in vals.items():
        exact = sum((Fraction(v) for v in vs), Fraction(0))
        out[k] = {
            "count": len(vs),
            "sum": math.fsum(vs),
            "min": min(vs),
            "max": max(vs),
            "avg": float(exact / len(vs)),
        }
    return out
