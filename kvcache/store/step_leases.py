"""StepLease: a decode step whose rows an engine process writes in the shared page pool itself (docs/architecture.md,
"Shared pool"): the store planned it and holds its sequences against every other change until the engine commits
the step, aborts it, or the lease runs out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvcache.errors import SequenceLeased
from kvcache.store.page_table import SequenceState
from kvcache.store.step_plan import StepPlan


@dataclass
class StepLease:
    """One lease: its plan (the first step's), its steps (pages ready for that many new positions per sequence) and
    when it runs out (time.monotonic())."""

    plan: StepPlan
    seqs: list[SequenceState]
    deadline: float
    # Called before the store reads or changes the step's pages as it ends the lease: a GPU engine's writes are
    # ordered first (kvcache.service.pool_sessions).
    wait_writes: Callable[[], None] | None = None
    steps: int = 1

    @property
    def step_id(self) -> str:
        """The step's id, as the engine names it when it commits or aborts."""
        return self.plan.step_id


class StepLeases:
    """The live leases, by sequence id."""

    def __init__(self) -> None:
        self._by_seq: dict[str, StepLease] = {}

    def add(self, lease: StepLease) -> None:
        """Hold every sequence of `lease`."""
        for seq_id in lease.plan.seq_ids:
            self._by_seq[seq_id] = lease

    def drop(self, lease: StepLease) -> None:
        """Release `lease`'s sequences."""
        for seq_id in lease.plan.seq_ids:
            if self._by_seq.get(seq_id) is lease:
                del self._by_seq[seq_id]

    def holds(self, lease: StepLease) -> bool:
        """Whether `lease` is still live (neither committed, aborted nor ended as overdue)."""
        return bool(lease.plan.seq_ids) and self._by_seq.get(lease.plan.seq_ids[0]) is lease

    def of(self, seq_id: str) -> StepLease | None:
        """The lease holding `seq_id`, if any."""
        return self._by_seq.get(seq_id)

    def overdue(self, now: float | None = None) -> list[StepLease]:
        """Leases past their deadline."""
        now = time.monotonic() if now is None else now
        return list({id(x): x for x in self._by_seq.values() if x.deadline < now}.values())

    def __len__(self) -> int:
        return len({id(x) for x in self._by_seq.values()})


def leased_error(seq_id: str, lease: StepLease) -> SequenceLeased:
    """The error for a call that would change `seq_id` while `lease` holds it."""
    left = max(0.0, lease.deadline - time.monotonic())
    return SequenceLeased(f"sequence {seq_id} is in a decode step leased to an engine on the shared pool (the lease "
                          f"ends within {left:.1f} s): commit or abort that step first")
