"""MappedStore: an engine's view of a server's shared page pool (docs/architecture.md, "Shared pool").

It is a KVStore over the server's pool tensors, mapped from shared memory, that holds only the sequences of the lease
the engine took, as the server's lease described them: their page tables, lengths, and value sums (in the
connection's workspace, which the server takes back when the lease is committed). It never allocates: the server
made the pages of the lease's steps ready. The engine's DecodeStep (or graph) then appends and attends on it as on
its own store, step after step until the lease's steps are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import PlanStale
from kvcache.store import KVStore
from kvcache.store.page_pool import PagePool
from kvcache.store.page_table import SequenceState, build_csr
from kvcache.store.shared_segment import CudaSegment, SharedSegment
from kvcache.store.step_plan import StepPlan, StepRows


class MappedStore(KVStore):
    """A KVStore over a mapped shared pool, whose sequences are those of the lease installed last."""

    def __init__(self, config: KVCacheConfig, segment: SharedSegment | CudaSegment, scratch_page: int = 0) -> None:
        super().__init__(config, PagePool(config, segment))
        self._lease_id = ""
        self._seq_ids: tuple[str, ...] = ()
        self.steps_left = 0  # steps of the installed lease not yet planned
        self.steps_done = 0  # its steps whose every layer's rows are written
        self._scratch_page = scratch_page  # the server's: a page of the shared pool that no sequence holds

    def install(self, step_id: str, seq_ids: Sequence[str], starts: Sequence[int], pages: Sequence[Sequence[int]],
                value_sums: torch.Tensor, steps: int = 1) -> None:
        """Take the server's lease of `steps` steps: each sequence's positions before it, its page ids (those of the
        lease's new positions included) and its value sums value_sums[b] [L, Hkv, d] (a view of the workspace,
        updated in place)."""
        c = self.config
        with self._lock:
            seqs = []
            for b, (seq_id, start, table) in enumerate(zip(seq_ids, starts, pages)):
                # The last lease's states are reused: a new one allocates value sums (a GPU launch) it would drop.
                seq = self._seqs.get(seq_id) or SequenceState(seq_id, c)
                seq.num_pages = 0
                seq.push_pages(list(table))
                seq.lengths = [start] * c.num_layers
                seq.value_sum = value_sums[b]
                seqs.append(seq)
            self._seqs = {seq.seq_id: seq for seq in seqs}
            self._lease_id, self._seq_ids = step_id, tuple(seq_ids)
            self.steps_left, self.steps_done = steps, 0

    def can_step(self, seq_ids: Sequence[str]) -> bool:
        """Whether the installed lease holds another step of exactly `seq_ids`."""
        return bool(self.steps_left) and tuple(seq_ids) == self._seq_ids

    @property
    def lease_id(self) -> str:
        """The installed lease's id ("" once none is)."""
        return self._lease_id

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1, page_table: bool = True) -> StepPlan:
        """The next step of the installed lease, over the pages the server made ready for it."""
        with self._lock:
            if not self.steps_left or tuple(seq_ids) != self._seq_ids or new_tokens != 1:
                raise PlanStale("a step over the shared pool runs the sequences its lease names, as many steps as it "
                                "holds: lease it first")
            seqs = [self._seqs[s] for s in seq_ids]
            starts = [seq.lengths[0] for seq in seqs]
            if any(self.config.pages_for(n + 1) > seq.num_pages for seq, n in zip(seqs, starts)):
                raise PlanStale("a step over the shared pool past the pages its lease holds: lease it again")
            self.steps_left -= 1
            csr = build_csr(seqs, 0, self.config.device, [n + 1 for n in starts]) if page_table else None
            return StepPlan(tuple(seq_ids), 1, tuple(starts), tuple(s.generation for s in seqs), csr, self._lease_id)

    def append_planned(self, step: StepRows, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """KVStore.append_planned, counting the step done once its last layer is written."""
        super().append_planned(step, layer, k, v)
        if all(step.written):
            self.steps_done += 1

    def commit_rows(self, step: StepRows) -> None:
        """KVStore.commit_rows (a replayed graph wrote every layer's rows), counting the step done."""
        super().commit_rows(step)
        self.steps_done += 1

    def end_lease(self) -> tuple[str, int]:
        """The installed lease's id and its steps written whole, as the server is to be told when it ends; none is
        installed after."""
        with self._lock:
            ended = (self._lease_id, self.steps_done)
            self._lease_id, self._seq_ids, self.steps_left = "", (), 0
            return ended

    def reserve_scratch_page(self) -> int:
        """The server's scratch page (a graph's warm-up writes there): this store allocates nothing itself."""
        return self._scratch_page

    def _register(self, seq: SequenceState) -> None:
        """Nothing: the server hashes full pages into its prefix cache when the step is committed."""
