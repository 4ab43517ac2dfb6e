"""Per-client caps on sequences and pages: one client (a connection) cannot take the whole store.

A sequence belongs to the client that created (or forked) it, named by its connection's peer address
(docs/wire-protocol.md, "Limits"). Ownership only counts toward the caps: sequence ids are unguessable and any
client that holds one may use it, as an engine that hands a sequence to another process expects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from kvcache.errors import QuotaExceeded
from kvcache.store import KVStore


class ClientQuotas:
    """Owner of every sequence created over the wire, and the caps a client's sequences and pages are held to
    (0: no cap)."""

    def __init__(self, store: KVStore, max_sequences: int = 0, max_pages: int = 0) -> None:
        self.store = store
        self.max_sequences = max_sequences
        self.max_pages = max_pages
        self._held: dict[str, set[str]] = {}
        self._pending: dict[str, int] = {}  # sequences being made, per client
        self._lock = threading.RLock()

    def _live(self, client: str) -> set[str]:
        # Sequences freed by any path (Free, a lease running out) drop out here, so no hook can be missed.
        held = self._held.get(client, set())
        live = {s for s in held if self.store.has_sequence(s)}
        self._held[client] = live
        return live

    def prune(self) -> None:
        """Forget freed sequences and clients that hold none (clients that went away never call again)."""
        with self._lock:
            for client in list(self._held):
                if not self._live(client):
                    del self._held[client]

    @contextlib.contextmanager
    def new_sequence(self, client: str) -> Iterator[Callable[[str], None]]:
        """Admit one more sequence for `client` (QuotaExceeded at max_sequences) and hold its place while it is
        made: the body calls the yielded function with the new id. Concurrent creates on one connection cannot
        pass the cap together."""
        with self._lock:
            held = len(self._live(client)) + self._pending.get(client, 0)
            if self.max_sequences and held >= self.max_sequences:
                raise QuotaExceeded(f"this client already holds {held} sequences, the most the server allows one "
                                    f"client (--max-sequences-per-client); free some first")
            self._pending[client] = self._pending.get(client, 0) + 1
        try:
            yield lambda seq_id: self.own(client, seq_id)
        finally:
            with self._lock:
                self._pending[client] -= 1
                if not self._pending[client]:
                    del self._pending[client]

    def admit_pages(self, client: str, new_pages: int) -> None:
        """QuotaExceeded if `client`'s sequences would hold more than max_pages pages after `new_pages` more."""
        if not self.max_pages or new_pages <= 0:
            return
        with self._lock:
            held = self.store.pages_held(self._live(client))
        if held + new_pages > self.max_pages:
            raise QuotaExceeded(f"this client's sequences hold {held} pages and need {new_pages} more; the server "
                                f"allows one client {self.max_pages} (--max-pages-per-client)")

    def own(self, client: str, seq_id: str) -> None:
        """Record that `client` created `seq_id`."""
        with self._lock:
            self._held.setdefault(client, set()).add(seq_id)

