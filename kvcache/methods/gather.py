"""Gathers from the page pool through a page table: whole sequences, chosen rows, chosen key dims."""

from __future__ import annotations

import torch

from kvcache.store.page_table import PageTableCSR


def gather_sequence(pool: torch.Tensor, csr: PageTableCSR, b: int) -> torch.Tensor:
    """Rows of sequence b from a sequence-major pool [N, Hkv, P, d] -> [Hkv, S, d]."""
    pages = csr.pages_of(b)
    S = csr.host_lens[b]
    rows = pool[pages]  # [n, Hkv, P, d]
    return rows.permute(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])[:, :S]


def gather_rows(pool: torch.Tensor, csr: PageTableCSR, b: int, positions: torch.Tensor) -> torch.Tensor:
    """Rows at `positions` [Hkv, k] of sequence b from a sequence-major pool -> [Hkv, k, d]."""
    pages = csr.pages_of(b)[positions // csr.page_size].long()  # [Hkv, k]
    Hkv, d = pool.shape[1], pool.shape[3]
    heads = torch.arange(Hkv, device=pool.device)[:, None]
    slots = positions % csr.page_size
    strides = pool.stride()
    if strides[3] != 1 or any(st % d for st in strides[:3]) or pool.storage_offset() % d:
        return pool[pages, heads, slots]
    # Rows by their index in a [rows, d] view of the pool's memory, one index_select of whole rows, where indexing
    # with three index tensors goes element by element (3 x 512 rows of 64 floats on the 2-core CPU: 60 against
    # 81 us).
    row = (pool.storage_offset() // d + pages * (strides[0] // d) + heads * (strides[1] // d)
           + slots.long() * (strides[2] // d))
    return _select_runs(pool, d, row).view(Hkv, -1, d)


def gather_key_dims(k_dim: torch.Tensor, csr: PageTableCSR, b: int, dims: torch.Tensor) -> torch.Tensor:
    """Key components `dims` [Hkv, r] of sequence b from the dim-major pool [N, Hkv, d, P] -> [Hkv, r, S].

    Only the r chosen rows of each page are read: each a contiguous run of P values.
    """
    pages = csr.pages_of(b).long()
    S = csr.host_lens[b]
    _, Hkv, _, P = k_dim.shape
    s_page, s_head, s_dim, _ = k_dim.stride()
    heads = torch.arange(Hkv, device=k_dim.device)[:, None, None]
    # Runs of P values by their row in a [rows, P] view of the pool's memory (whatever its axis order: every stride
    # but the positions' is a multiple of P), listed head, dim, page: one index_select of whole runs lands them as
    # [Hkv, r, n * P] with no copy after it (indexing with three index tensors went element by element: 1.5 ms
    # against 0.2 ms at 8K positions on the CPU; listing by page first cost a permuting copy).
    run = (k_dim.storage_offset() // P + pages[None, None, :] * (s_page // P) + heads * (s_head // P)
           + dims.long()[:, :, None] * (s_dim // P))  # divided by P before the sums: no tensor division
    return _select_runs(k_dim, P, run).view(dims.shape[0], dims.shape[1], -1)[:, :, :S]


def _select_runs(pool: torch.Tensor, width: int, runs: torch.Tensor) -> torch.Tensor:
    """Runs of `width` contiguous values of pool's memory, by their row index in a [rows, width] view of the whole
    storage (its offset included): [runs.numel(), width], one index_select."""
    rows = pool.untyped_storage().nbytes() // (pool.element_size() * width)
    return pool.as_strided((rows, width), (width, 1), 0).index_select(0, runs.flatten())
