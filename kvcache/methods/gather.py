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
    if not runs_fit(pool, d):
        return pool[pages, heads, slots]
    strides = pool.stride()
    # Rows by their index in a [rows, d] view of the pool's memory, one index_select of whole rows, where indexing
    # with three index tensors goes element by element (3 x 512 rows of 64 floats on the 2-core CPU: 60 against
    # 81 us).
    row = pages * (strides[0] // d) + heads * (strides[1] // d) + slots.long() * (strides[2] // d)
    return runs_view(pool, d).index_select(0, row.flatten()).view(Hkv, -1, d)


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
    run = (pages[None, None, :] * (s_page // P) + heads * (s_head // P)
           + dims.long()[:, :, None] * (s_dim // P))  # divided by P before the sums: no tensor division
    return runs_view(k_dim, P).index_select(0, run.flatten()).view(dims.shape[0], dims.shape[1], -1)[:, :, :S]


def runs_fit(pool: torch.Tensor, width: int) -> bool:
    """Whether a pool can be read as runs of `width` contiguous values: its last stride 1, its other strides and its
    offset multiples of width (as the store lays its pools out)."""
    return (pool.stride(-1) == 1 and pool.storage_offset() % width == 0
            and all(st % width == 0 for st in pool.stride()[:-1]))


def runs_view(pool: torch.Tensor, width: int) -> torch.Tensor:
    """The pool's storage from its first element as [rows, width] (runs_fit true): a run's row is its offset from
    the pool's first element over `width`."""
    offset = pool.storage_offset()
    rows = (pool.untyped_storage().nbytes() // pool.element_size() - offset) // width
    return pool.as_strided((rows, width), (width, 1), offset)
