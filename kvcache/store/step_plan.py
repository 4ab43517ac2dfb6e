"""StepPlan: a decode step's page table, built and sent to the device once and read by every layer's call.

A decode step makes one attend call per layer, each over the same sequences and the same pages (a page id
names its positions in every layer). Planning the step (FlashInfer's plan/run split) checks the sequences,
gives each the pages its new token needs, and builds the batch's CSR page table on the device for the lengths
every layer reaches once it has appended that token; each layer's call then only checks that the plan still
holds and runs. See docs/architecture.md.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from kvcache.kernels.csr import PageTableCSR
from kvcache.store.page_pool import RowTargets


@dataclass(frozen=True)
class StepPlan:
    """One planned decode step of `seq_ids`, each layer's call appending `new_tokens` (0 or 1) first."""

    seq_ids: tuple[str, ...]
    new_tokens: int
    start_lengths: tuple[int, ...]  # every layer's positions per sequence when the step was planned
    generations: tuple[int, ...]  # the page tables' generations then (kvcache.store.page_table.SequenceState)
    csr: PageTableCSR | None  # for start_lengths + new_tokens positions; None in a remote client's handle
    step_id: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass
class StepRows:
    """Where a planned step's new row of each sequence goes, worked out once for every layer (KVStore.plan_rows):
    what each layer's append then writes without any host work but its launches."""

    plan: StepPlan
    seqs: list  # the sequences' SequenceState, to notice one freed or forked since
    rows: list[tuple[int, int, int]]  # per sequence (page id, device slot, row in the page)
    page_ids: torch.Tensor  # [B] int64 on the CPU: the pages written (for summary listeners)
    tables: torch.Tensor | None  # [L, 4, B] int64 on the device: append_rows_triton's rows per layer (CUDA only)
    written: list[bool]  # per layer
    targets: RowTargets | None = None  # the rows as the torch append indexes them (PagePool.row_targets)
