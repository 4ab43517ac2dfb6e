"""MInference sparse prefill on the CPU (docs/sparse-attention.md §2): the keys an index lists, and only those.

The torch reference (kvcache.prefill.minference) computes every (query, key) logit of a head and masks the pairs the
index leaves out, so on the CPU a sparse prefill cost more than dense attention. Here each query block reads the
positions its index lists (its key blocks expanded to their rows, then its columns) as one gathered [L, d] tile,
and QUERY_BLOCKS query blocks of a head go through one batched product: the work follows the listed pairs. Tiles are
padded to the longest list of their batch; padding and the causal edge are masked. Same results as the reference
(out in q's dtype, lse float32 natural log; a query with no allowed key gets out 0 and lse -inf).
"""

from __future__ import annotations

import math

import torch

from kvcache.methods.gather import gather_sequence
from kvcache.prefill.minference_index import SparseIndex, chunk_keys
from kvcache.store.page_table import PageTableCSR

# One fused product per batch (ATen's CPU flash kernel, the listed pairs as an additive mask): it gives out and lse.
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
QUERY_BLOCKS = 16  # query blocks of a head per product: a [16, B, L] float mask, 33 MB at B=64, L=8192


def listed_positions(index: SparseIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions each (head, query block) reads and which of them are listed: [Hq, nq, L] int64 and bool, L =
    max_blocks * block_size + max_columns (the blocks' rows first, then the columns)."""
    B = index.block_size
    rows = torch.arange(B, device=index.block_index.device)
    blocks = index.block_index.long()
    max_blocks, max_cols = blocks.shape[-1], index.column_index.shape[-1]
    in_blocks = (torch.arange(max_blocks, device=blocks.device) < index.block_count.long()[..., None])
    positions = [(blocks[..., None] * B + rows).flatten(-2)]
    listed = [in_blocks[..., None].expand(*in_blocks.shape, B).flatten(-2)]
    if max_cols:
        positions.append(index.column_index.long())
        listed.append(torch.arange(max_cols, device=blocks.device) < index.column_count.long()[..., None])
    return torch.cat(positions, dim=-1), torch.cat(listed, dim=-1)


def block_sparse_prefill(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    index: SparseIndex,
    *,
    b: int = 0,
    scale: float | None = None,
    query_blocks: int = QUERY_BLOCKS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the chunk q [T, Hq, d] at index.start over sequence b's paged K/V, on the index's pairs only:
    out [T, Hq, d] (q dtype), lse [T, Hq] float32, as kvcache.prefill.minference.minference_prefill gives them."""
    index.check_chunk(q)
    T, Hq, d = q.shape
    S, B = index.num_keys, index.block_size
    keys = chunk_keys(k_seq, csr, index.start, q, b).float()  # [Hkv, S, d]
    values = gather_sequence(v_seq, csr, b)[:, :S].float()
    G = Hq // keys.shape[0]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nq, first = index.num_query_blocks, index.first_block * B  # query row r of the padded chunk is position first + r
    q_rows = torch.zeros((nq * B, Hq, d), dtype=torch.float32)
    at = index.start - first
    q_rows[at : at + T] = q.float()
    q_pos = (first + torch.arange(nq * B)).view(nq, B)
    positions, listed = listed_positions(index)
    listed &= (positions >= 0) & (positions < S)
    positions = positions.clamp(0, S - 1)
    out_rows = torch.zeros((nq * B, Hq, d), dtype=torch.float32)
    lse_rows = torch.full((nq * B, Hq), float("-inf"), dtype=torch.float32)
    for h in range(Hq):
        kv = h // G
        for m0 in range(0, nq, query_blocks):
            m1 = min(nq, m0 + query_blocks)
            keep = listed[h, m0:m1]
            width = int(keep.sum(-1).max())  # the longest list of the batch: its tiles' width
            if width == 0:
                continue
            pos = positions[h, m0:m1]
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]  # the listed ones first
            pos, keep = pos.gather(1, order), keep.gather(1, order)
            k_tile, v_tile = keys[kv][pos][:, None], values[kv][pos][:, None]  # [m, 1, width, d]
            allowed = keep[:, None, :] & (pos[:, None, :] <= q_pos[m0:m1, :, None])  # [m, B, width]
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, None]
            y, row_lse = _FLASH_CPU(q_rows[m0 * B : m1 * B, h].view(m1 - m0, 1, B, d), k_tile, v_tile, 0.0, False,
                                    attn_mask=bias, scale=scale)
            # A row with no allowed key (its first listed position after it) gets out 0 from the kernel, lse -inf here.
            first_key = pos.masked_fill(~keep, S).min(dim=-1).values  # [m]
            empty = (q_pos[m0:m1] < first_key[:, None]).view(-1)
            row_lse = row_lse.view(-1).masked_fill(empty, float("-inf"))
            out_rows[m0 * B : m1 * B, h] = y.view(-1, d)
            lse_rows[m0 * B : m1 * B, h] = row_lse
    return out_rows[at : at + T].to(q.dtype), lse_rows[at : at + T]
