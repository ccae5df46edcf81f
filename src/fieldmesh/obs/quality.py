"""Prometheus collector of data-product quality (docs/products.md): read from the hot store at each scrape.

Gauges, labelled by ``product`` (and ``objective`` for SLO status):

- ``fieldmesh_product_completeness``, ``..._null_rate``, ``..._out_of_range_rate``, ``..._duplicate_rate``,
  ``..._drift_psi``: of the product's latest closed window;
- ``fieldmesh_product_freshness_seconds``: since the newest reading of the product was received;
- ``fieldmesh_product_sequence_gaps``: sequence numbers missing over the product's devices and boots;
- ``fieldmesh_product_slo_ok``: 1 met, 0 broken, per declared objective (absent while it has no value).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fieldmesh.store.products import ProductTables

__all__ = ["QualityCollector"]

log = logging.getLogger(__name__)

_RATES: Final = ("completeness", "null_rate", "out_of_range_rate", "duplicate_rate", "drift_psi")


class QualityCollector(Collector):
    """Yields the quality gauges of every product; ``tables`` opens (once) the product tables."""

    def __init__(self, tables: Callable[[], ProductTables]) -> None:
        self._tables = tables

    def collect(self) -> Iterator[Any]:
        """The gauges (nothing, and a log line, when the store cannot be read: the scrape still answers)."""
        try:
            readouts = self._tables().all_quality()
        except Exception as exc:
            log.warning("product quality unavailable for /metrics: %s", exc)
            return
        fams = {k: GaugeMetricFamily(f"fieldmesh_product_{k}", f"Data product {k.replace('_', ' ')} of the latest "
                                     "closed window", labels=["product"]) for k in _RATES}
        fresh = GaugeMetricFamily("fieldmesh_product_freshness_seconds",
                                  "Seconds since the newest reading of the product was received", labels=["product"])
        gaps = GaugeMetricFamily("fieldmesh_product_sequence_gaps",
                                 "Sequence numbers missing in the product's readings", labels=["product"])
        slo = GaugeMetricFamily("fieldmesh_product_slo_ok", "1 when the product meets the objective, 0 when not",
                                labels=["product", "objective"])
        for q in readouts:
            name = q["product"]
            for k in _RATES:
                v = q["current"].get(k)
                if v is not None:
                    fams[k].add_metric([name], float(v))
            if q["current"].get("freshness_s") is not None:
                fresh.add_metric([name], float(q["current"]["freshness_s"]))
            gaps.add_metric([name], float(q["sequence"]["gaps"]))
            for obj, s in q["slo"].items():
                if s["ok"] is not None:
                    slo.add_metric([name, obj], 1.0 if s["ok"] else 0.0)
        yield from fams.values()
        yield fresh
        yield gaps
        yield slo
