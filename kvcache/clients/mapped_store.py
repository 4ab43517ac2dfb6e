"""MappedStore: an engine's view of a server's shared page pool (docs/architecture.md, "Shared pool").

It is a KVStore over the server's pool tensors, mapped from shared memory, that holds only the sequences of the step
the engine leased, as the server's lease described them: their page tables, lengths, and value sums (in the
connection's workspace, which the server takes back when the step is committed). It never allocates: the server
planned the step's pages. The engine's DecodeStep (or graph) then appends and attends on it as on its own store.
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
    """A KVStore over a mapped shared pool, whose sequences are those of the step installed last."""

    def __init__(self, config: KVCacheConfig, segment: SharedSegment | CudaSegment, scratch_page: int = 0) -> None:
        super().__init__(config, PagePool(config, segment))
        self._installed: StepPlan | None = None
        self._scratch_page = scratch_page  # the server's: a page of the shared pool that no sequence holds
        self.completed = ""  # the step_id of the installed step once every layer's rows are written

    def install(self, step_id: str, seq_ids: Sequence[str], starts: Sequence[int], pages: Sequence[Sequence[int]],
                value_sums: torch.Tensor) -> None:
        """Take the server's lease of a step: each sequence's positions before it, its page ids (the new position's
        page included) and its value sums value_sums[b] [L, Hkv, d] (a view of the workspace, updated in place)."""
        c = self.config
        with self._lock:
            seqs = []
            for b, (seq_id, start, table) in enumerate(zip(seq_ids, starts, pages)):
                # The last step's states are reused: a new one allocates value sums (a GPU launch) it would drop.
                seq = self._seqs.get(seq_id) or SequenceState(seq_id, c)
                seq.num_pages = 0
                seq.push_pages(list(table))
                seq.lengths = [start] * c.num_layers
                seq.value_sum = value_sums[b]
                seqs.append(seq)
            self._seqs = {seq.seq_id: seq for seq in seqs}
            self.completed = ""
            csr = build_csr(seqs, 0, c.device, [n + 1 for n in starts])
            self._installed = StepPlan(tuple(seq_ids), 1, tuple(starts), tuple(s.generation for s in seqs), csr,
                                       step_id)

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1) -> StepPlan:
        """The installed step's plan (once): the server planned it when it leased the step."""
        with self._lock:
            plan, self._installed = self._installed, None
            if plan is None or tuple(seq_ids) != plan.seq_ids or new_tokens != 1:
                raise PlanStale("a step over the shared pool runs the sequences its lease names, once: lease it first")
            return plan

    def append_planned(self, step: StepRows, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """KVStore.append_planned, noting when the step's last layer is written."""
        super().append_planned(step, layer, k, v)
        if all(step.written):
            self.completed = step.plan.step_id

    def commit_rows(self, step: StepRows) -> None:
        """KVStore.commit_rows (a replayed graph wrote every layer's rows), noting the step complete."""
        super().commit_rows(step)
        self.completed = step.plan.step_id

    def reserve_scratch_page(self) -> int:
        """The server's scratch page (a graph's warm-up writes there): this store allocates nothing itself."""
        return self._scratch_page

    def _register(self, seq: SequenceState) -> None:
        """Nothing: the server hashes full pages into its prefix cache when the step is committed."""
