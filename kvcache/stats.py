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
