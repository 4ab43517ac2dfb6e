"""SequenceLocks: calls on one sequence are ordered, calls on different sequences run in parallel."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class SequenceLocks:
    """One lock per sequence id while some call holds or waits for it; several are taken in sorted order.

    Entries are counted and dropped when the last user leaves, so ids that name no sequence (or
    freed ones) leave nothing behind.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # id -> [lock, users]

    def hold(self, seq_ids: Iterable[str]) -> _Held:
        """Hold the locks of `seq_ids` for the body of the with-block."""
        return _Held(self, sorted(set(seq_ids)))

    def _acquire(self, ids: list[str]) -> list:
        with self._guard:
            entries = []
            for seq_id in ids:
                entry = self._locks.get(seq_id)
                if entry is None:
                    entry = self._locks[seq_id] = [threading.Lock(), 0]
                entry[1] += 1
                entries.append(entry)
        acquired = []
        try:
            for entry in entries:
                entry[0].acquire()
                acquired.append(entry)
        except BaseException:
            self._release(ids, entries, acquired)
            raise
        return entries

    def _release(self, ids: list[str], entries: list, acquired: list) -> None:
        for entry in reversed(acquired):
            entry[0].release()
        with self._guard:
            for seq_id, entry in zip(ids, entries):
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[seq_id]

    def __len__(self) -> int:
        return len(self._locks)


class _Held:
    """The with-block of SequenceLocks.hold: a plain context manager, not a generator's, as it runs on every call."""

    __slots__ = ("_entries", "_ids", "_locks")

    def __init__(self, locks: SequenceLocks, ids: list[str]) -> None:
        self._locks = locks
        self._ids = ids
        self._entries: list = []

    def __enter__(self) -> None:
        self._entries = self._locks._acquire(self._ids)

    def __exit__(self, *exc) -> None:
        self._locks._release(self._ids, self._entries, self._entries)
