"""Per-sequence page tables and their CSR export (FlashInfer's indptr / indices / last_page_len)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.kernels.csr import PageTableCSR
from kvcache.store.allocator import ROOT_HASH
from kvcache.store.host_copy import host_buffer, to_device_async


@dataclass
class SequenceState:
    """One sequence: its pages (shared by all layers), per-layer lengths, value sums and token ids."""

    seq_id: str
    config: KVCacheConfig
    pages: torch.Tensor = field(init=False)  # [capacity] int32 page ids; the first num_pages are live
    num_pages: int = 0
    lengths: list[int] = field(init=False)  # cached positions per layer
    value_sum: torch.Tensor = field(init=False)  # [L, Hkv, d] float32 running sum of V
    token_ids: list[int] = field(default_factory=list)
    num_hashed_pages: int = 0  # leading full pages registered in the prefix cache
    last_hash: bytes = ROOT_HASH
    cached_tokens: int = 0  # positions reused from the prefix cache at creation
    generation: int = 0  # bumped whenever a page id of the table changes or the pages become shared (a fork)
    lease_seconds: float | None = None  # freed once unused this long (None: kept until freed)
    lease_deadline: float = float("inf")  # time.monotonic() past which the lease has run out

    def __post_init__(self) -> None:
        c = self.config
        self.pages = torch.empty(16, dtype=torch.int32)
        self.lengths = [0] * c.num_layers
        self.value_sum = torch.zeros((c.num_layers, c.num_kv_heads, c.head_dim), dtype=SUMMARY_DTYPE, device=c.device)

    @property
    def live_pages(self) -> torch.Tensor:
        """Page ids in position order [num_pages] (int32, CPU)."""
        return self.pages[: self.num_pages]

    def push_pages(self, new_pages: list[int]) -> None:
        """Append page ids to the table, growing its buffer by doubling."""
        need = self.num_pages + len(new_pages)
        if need > self.pages.numel():
            grown = torch.empty(max(need, 2 * self.pages.numel()), dtype=torch.int32)
            grown[: self.num_pages] = self.live_pages
            self.pages = grown
        self.pages[self.num_pages : need] = torch.tensor(new_pages, dtype=torch.int32)
        self.num_pages = need
        self.generation += 1

    def clone_as(self, seq_id: str) -> SequenceState:
        """A copy sharing the same page ids (references are the caller's business)."""
        other = SequenceState(seq_id, self.config)
        other.pages = self.pages.clone()
        other.num_pages = self.num_pages
        other.lengths = list(self.lengths)
        other.value_sum = self.value_sum.clone()
        other.token_ids = list(self.token_ids)
        other.num_hashed_pages = self.num_hashed_pages
        other.lease_seconds = self.lease_seconds
        other.last_hash = self.last_hash
        return other


def build_csr(seqs: list[SequenceState], layer: int, device: torch.device,
              lens: list[int] | None = None) -> PageTableCSR:
    """CSR page table of `seqs` for `layer`: only the pages that layer has written into (or, given `lens`, the
    pages that hold that many positions of each sequence)."""
    P = seqs[0].config.page_size if seqs else 1
    B = len(seqs)
    lens = [s.lengths[layer] for s in seqs] if lens is None else lens
    counts = [-(-n // P) for n in lens]
    # One host buffer and one copy for the three arrays (each starting 16-byte aligned, as Triton
    # prefers its pointers): a decode step makes a page table per layer.
    at_last = -(-(B + 1) // 4) * 4
    at_indices = at_last + -(-B // 4) * 4
    header = [0] * at_indices
    for b, (n, c) in enumerate(zip(lens, counts)):
        header[b + 1] = header[b] + c  # indptr
        header[at_last + b] = n - (c - 1) * P if c else 0  # last_page_len
    flat = host_buffer(at_indices + sum(counts), torch.int32, device)
    flat[:at_indices] = torch.tensor(header, dtype=torch.int32)
    if B:
        torch.cat([s.pages[:c] for s, c in zip(seqs, counts)], out=flat[at_indices:])
    flat = to_device_async(flat, device)
    return PageTableCSR(flat[: B + 1], flat[at_indices:], flat[at_last : at_last + B], P, tuple(lens))
