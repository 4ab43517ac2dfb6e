"""Eviction policies: which device-resident pages go down a tier first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    """Tracks uses of device-resident pages and names victims; the tier manager asks it."""

    def touch(self, pages: Iterable[int]) -> None:
        """Pages were written or read on the device (or arrived there)."""

    def forget(self, pages: Iterable[int]) -> None:
        """Pages left the device (moved down or freed)."""

    def victims(self, n: int, pinned: set[int]) -> list[int]:
        """Up to n resident pages to move down, best victim first, none of them in `pinned`."""


class LRUPolicy:
    """Least recently used first: the default."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def touch(self, pages: Iterable[int]) -> None:
        """Move pages to the most-recent end."""
        for p in pages:
            self._order[p] = None
            self._order.move_to_end(p)

    def forget(self, pages: Iterable[int]) -> None:
        """Stop tracking pages."""
        for p in pages:
            self._order.pop(p, None)

    def victims(self, n: int, pinned: set[int]) -> list[int]:
        """The n least recently used unpinned pages."""
        out: list[int] = []
        for p in self._order:
            if len(out) == n:
                break
            if p not in pinned:
                out.append(p)
        return out


class SparseAwarePolicy(LRUPolicy):
    """Pages that sparse attention rarely chooses go first; LRU among equally chosen pages.

    `chosen(pages)` is called with the pages whose rows stage 2 (or Quest) read; plain touches
    (writes, dense reads) do not count as a choice. Counts decay by half every `half_life` choices
    so that a page chosen long ago does not stay forever.
    """

    def __init__(self, half_life: int = 4096) -> None:
        super().__init__()
        self._count: dict[int, float] = {}
        self._events = 0
        self._half_life = half_life

    def chosen(self, pages: Iterable[int]) -> None:
        """Record that sparse attention read from these pages."""
        for p in pages:
            self._count[p] = self._count.get(p, 0.0) + 1.0
            self._events += 1
        if self._events >= self._half_life:
            self._events = 0
            self._count = {p: c / 2 for p, c in self._count.items() if c >= 0.5}

    def forget(self, pages: Iterable[int]) -> None:
        """Stop tracking pages."""
        pages = list(pages)
        super().forget(pages)
        for p in pages:
            self._count.pop(p, None)

    def victims(self, n: int, pinned: set[int]) -> list[int]:
        """The n unpinned pages chosen least often (ties: least recently used)."""
        rank = {p: i for i, p in enumerate(self._order)}
        candidates = [p for p in self._order if p not in pinned]
        candidates.sort(key=lambda p: (self._count.get(p, 0.0), rank[p]))
        return candidates[:n]
