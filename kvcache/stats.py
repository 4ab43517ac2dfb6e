"""Counters of calls, bytes read and time per attention method (what `stats` reports)."""

from __future__ import annotations

import threading
from collections import defaultdict


class MethodCounters:
    """Thread-safe totals per method: calls, bytes read, seconds spent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes_read": 0, "seconds": 0.0})

    def add(self, method: str, bytes_read: int, seconds: float) -> None:
        """Count one call of `method` that read `bytes_read` bytes in `seconds`."""
        with self._lock:
            t = self._totals[method]
            t["calls"] += 1
            t["bytes_read"] += bytes_read
            t["seconds"] += seconds

    def snapshot(self) -> dict[str, dict[str, float]]:
        """A copy of the totals, keyed by method."""
        with self._lock:
            return {m: dict(t) for m, t in self._totals.items()}
