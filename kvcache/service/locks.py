"""SequenceLocks: calls on one sequence are ordered, calls on different sequences run in parallel."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class SequenceLocks:
    """One lock per sequence id while some call holds or waits for it; several are taken in sorted order.

    Entries are counted and dropped when the last user leaves, so ids that name no sequence (or
    freed ones) leave nothing behind.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # id -> [lock, users]

    @contextmanager
    def hold(self, seq_ids: Iterable[str]) -> Iterator[None]:
        """Hold the locks of `seq_ids` for the body of the with-block."""
        ids = sorted(set(seq_ids))
        with self._guard:
            entries = []
            for seq_id in ids:
                entry = self._locks.setdefault(seq_id, [threading.Lock(), 0])
                entry[1] += 1
                entries.append(entry)
        acquired = []
        try:
            for entry in entries:
                entry[0].acquire()
                acquired.append(entry)
            yield
        finally:
            for entry in reversed(acquired):
                entry[0].release()
            with self._guard:
                for seq_id, entry in zip(ids, entries):
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._locks[seq_id]

    def __len__(self) -> int:
        return len(self._locks)
