"""Thread-safe running totals keyed by name: per attention method, per RPC."""

from __future__ import annotations

import threading
from collections.abc import Sequence


class Totals:
    """Sums of named fields per key (e.g. calls, bytes_read, seconds per method)."""

    def __init__(self, fields: Sequence[str]) -> None:
        self._fields = tuple(fields)
        self._lock = threading.Lock()
        self._totals: dict[str, dict[str, float]] = {}

    def add(self, key: str, **amounts: float) -> None:
        """Add `amounts` (field=value) to `key`'s totals."""
        with self._lock:
            t = self._totals.setdefault(key, dict.fromkeys(self._fields, 0))
            for field, value in amounts.items():
                t[field] += value

    def snapshot(self) -> dict[str, dict[str, float]]:
        """A copy of the totals."""
        with self._lock:
            return {k: dict(v) for k, v in self._totals.items()}


# Upper bounds of the coverage histogram's buckets (shares of attention mass): where an estimate falls below 0.9
# is worth telling from one below 0.5, and most calls of a good setting sit between 0.95 and 1.
COVERAGE_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


class CoverageTotals:
    """Per attention method and layer: the sequences whose coverage estimate was counted, the estimates' sum, how
    many fell at or below each bound of COVERAGE_BUCKETS (cumulative, as Prometheus buckets are), and how many of
    the sequences were attended densely instead (min_coverage)."""

    def __init__(self, buckets: Sequence[float] = COVERAGE_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._totals: dict[tuple[str, int], dict] = {}

    def add(self, method: str, layer: int, estimates: Sequence[float], fallbacks: int = 0) -> None:
        """Count one call's per-sequence estimates (shares in [0, 1]) and how many of its sequences fell back."""
        with self._lock:
            t = self._totals.setdefault((method, layer), {"count": 0, "sum": 0.0, "fallbacks": 0,
                                                          "cumulative": [0] * len(self.buckets)})
            t["count"] += len(estimates)
            t["sum"] += float(sum(estimates))
            t["fallbacks"] += fallbacks
            for value in estimates:
                for i, bound in enumerate(self.buckets):
                    t["cumulative"][i] += value <= bound

    def snapshot(self) -> dict[str, dict[int, dict]]:
        """{method: {layer: {count, sum, mean, fallbacks, buckets: {"0.5": sequences at or below 0.5, ...}}}}."""
        with self._lock:
            items = [(key, dict(t, cumulative=list(t["cumulative"]))) for key, t in self._totals.items()]
        out: dict[str, dict[int, dict]] = {}
        for (method, layer), t in sorted(items):
            out.setdefault(method, {})[layer] = coverage_entry(t["count"], t["sum"], t["fallbacks"],
                                                               dict(zip(map(str, self.buckets), t["cumulative"])))
        return out


def coverage_entry(count: int, total: float, fallbacks: int, buckets: dict[str, int]) -> dict:
    """One (method, layer) entry of a coverage snapshot; mean is None before any sequence was counted."""
    return {"count": count, "sum": total, "mean": total / count if count else None, "fallbacks": fallbacks,
            "buckets": buckets}


def merge_coverage(snapshots: Sequence[dict[str, dict[int, dict]]]) -> dict[str, dict[int, dict]]:
    """Coverage snapshots (CoverageTotals.snapshot) of several stores summed, e.g. the shards of one client."""
    out: dict[str, dict[int, dict]] = {}
    for snap in snapshots:
        for method, layers in snap.items():
            for layer, e in layers.items():
                into = out.setdefault(method, {}).get(layer)
                if into is None:
                    into = coverage_entry(0, 0.0, 0, dict.fromkeys(e["buckets"], 0))
                buckets = {k: into["buckets"].get(k, 0) + n for k, n in e["buckets"].items()}
                out[method][layer] = coverage_entry(into["count"] + e["count"], into["sum"] + e["sum"],
                                                    into["fallbacks"] + e["fallbacks"], buckets)
    return out
