"""SequenceLocks: calls on one sequence are ordered, calls on different sequences run in parallel."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class SequenceLocks:
    """One lock per sequence id, made on first use; several are always taken in sorted order (no deadlock)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextmanager
    def hold(self, seq_ids: Iterable[str]) -> Iterator[None]:
        """Hold the locks of `seq_ids` for the body of the with-block."""
        with self._guard:
            locks = [self._locks.setdefault(s, threading.Lock()) for s in sorted(set(seq_ids))]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def forget(self, seq_id: str) -> None:
        """Drop the lock of a freed sequence (a later call on it finds no sequence anyway)."""
        with self._guard:
            self._locks.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._locks)
