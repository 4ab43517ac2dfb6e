"""MInference sparse prefill attention over the page table (docs/sparse-attention.md §2): block-sparse and
vertical-slash.

One program per (query head, query block of B rows) runs a flash-attention online softmax over
the key blocks its index lists, then (vertical-slash) over its gathered columns, B keys per step:

  block part   the listed key blocks, each a B x B tile; all but the last are strictly before
               the query block, so only the last (the diagonal block whenever listed) is
               masked causally and against the chunk's edges;
  column part  the extra key positions, gathered B at a time through the page table, masked.

Skipped blocks are never touched: the loop runs over the list, not over the causal range.
K/V rows are read through the CSR page table (sequence_extent, as the decode kernels do); GQA
maps query head h to kv head h // G. Returns out in q's dtype and lse in float32 (natural log).
The block-sparse and vertical-slash kernels are one Triton function specialised by WITH_COLUMNS.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_index import SparseIndex
from .csr import PageTableCSR
from .paged_decode import dot_precision, sequence_extent

# Launch parameters for B x B tiles (B = the index's block size, 64 by default). Compiled for sm_90 with bf16, d=128:
# 4 warps and 2 stages take 190 registers a thread (223 with columns), no spills, 80 KB of shared memory, and the
# block loop's page-id loads and K/V gathers are asynchronous copies pipelined behind the tensor-core dots. 3 stages
# (254 registers with columns) were 1-4% faster than 2 on an H100, for the full causal index and vertical-slash at
# 32K and 128K, and 4 stages slower for the causal index; 8 warps, or two query blocks per program (2B query rows
# per K/V tile), were slower at every setting tried (bench/results/prefill_pair_sweep_h100.json and _sweep2_h100).
NUM_WARPS = 4
NUM_STAGES = 3
LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos,
    k_ptr, v_ptr, indices_ptr, page_start, kv_offset, key_pos, key_valid,
    qk_scale, s_kn, s_kp, offs_d,
    P: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the keys at key_pos [BLOCK_N] (base-2 scores); MASKED applies
    key_valid and causality, otherwise every key is known valid and before every query."""
    if MASKED:
        page = tl.load(indices_ptr + page_start + key_pos // P, mask=key_valid, other=0).to(tl.int64)
    else:
        page = tl.load(indices_ptr + page_start + key_pos // P).to(tl.int64)
    row = page * s_kn + kv_offset + (key_pos % P) * s_kp
    if MASKED:
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=key_valid[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=key_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :])
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        keep = key_valid[None, :] & (key_pos[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet stay empty, not NaN
    p = tl.exp2(s - m_safe[:, None])
    rescale = tl.exp2(m_i - m_safe)
    l_i = l_i * rescale + tl.sum(p, axis=1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr,
    indptr_ptr, indices_ptr, last_len_ptr,
    block_index_ptr, block_count_ptr, column_index_ptr, column_count_ptr,
    out_ptr, lse_ptr,
    b, start, num_queries, first_block, num_qblocks, qk_scale,
    s_qt, s_qh, s_ot, s_oh, s_lt,
    s_kn, s_kh, s_kp,
    s_bh, s_bm, s_ch, s_cm,
    G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
    WITH_COLUMNS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(0)  # heads vary fastest: a group's heads run together and share K/V in L2
    m = num_qblocks - 1 - tl.program_id(1)  # the longest causal ranges start first
    page_start, _, seq_len = sequence_extent(indptr_ptr, last_len_ptr, b, P)
    kv_offset = (h // G) * s_kh

    offs_m = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    q_pos = (first_block + m) * BLOCK + offs_m
    q_row = (q_pos - start).to(tl.int64)
    mask_row = (q_row >= 0) & (q_row < num_queries)
    q = tl.load(q_ptr + q_row[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=mask_row[:, None], other=0.0)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, D], dtype=tl.float32)

    entry = h * num_qblocks + m
    num_blocks = tl.load(block_count_ptr + entry)
    blocks_ptr = block_index_ptr + h.to(tl.int64) * s_bh + m.to(tl.int64) * s_bm
    for i in range(num_blocks - 1):  # all but the last are strictly before the query block
        key_pos = tl.load(blocks_ptr + i) * BLOCK + offs_n
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, indices_ptr, page_start, kv_offset,
                                     key_pos, key_pos < seq_len, qk_scale, s_kn, s_kp, offs_d,
                                     P, False, DOT_PRECISION)
    if num_blocks > 0:
        key_pos = tl.load(blocks_ptr + num_blocks - 1) * BLOCK + offs_n
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, indices_ptr, page_start, kv_offset,
                                     key_pos, key_pos < seq_len, qk_scale, s_kn, s_kp, offs_d,
                                     P, True, DOT_PRECISION)
    if WITH_COLUMNS:
        num_columns = tl.load(column_count_ptr + entry)
        columns_ptr = column_index_ptr + h.to(tl.int64) * s_ch + m.to(tl.int64) * s_cm
        for c0 in range(0, num_columns, BLOCK):
            listed = c0 + offs_n < num_columns
            key_pos = tl.load(columns_ptr + c0 + offs_n, mask=listed, other=0)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, indices_ptr, page_start, kv_offset,
                                         key_pos, listed & (key_pos < seq_len), qk_scale, s_kn, s_kp, offs_d,
                                         P, True, DOT_PRECISION)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # x ln 2: natural log
    tl.store(out_ptr + q_row[:, None] * s_ot + h * s_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_row[:, None])
    tl.store(lse_ptr + q_row * s_lt + h, lse, mask=mask_row)


def sparse_prefill(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    index: SparseIndex,
    *,
    b: int = 0,
    scale: float | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the chunk q [T, Hq, d] at index.start over sequence b's paged K/V [N, Hkv, P, d],
    restricted to the index (blocks, plus columns when it has them): out [T, Hq, d] (q dtype), lse [T, Hq] f32.

    The block lists must be ascending and end at or before each query block's own block (every
    builder in kvcache.prefill.minference_index makes them so); the kernel masks causally only
    the last listed block and the columns. Raises ValueError (shapes), TypeError (dtypes) or IndexError (a
    chunk past the sequence's positions).
    """
    index.check_chunk(q)
    T, Hq, D = q.shape
    _, Hkv, P, _ = k_seq.shape
    B = index.block_size
    if Hq % Hkv or k_seq.shape[3] != D or k_seq.stride() != v_seq.stride() or k_seq.stride(3) != 1:
        raise ValueError(f"q [T, {Hq}, {D}] does not fit the pools k {tuple(k_seq.shape)} / v {tuple(v_seq.shape)}")
    if q.dtype != k_seq.dtype or v_seq.dtype != k_seq.dtype:
        raise TypeError(f"q is {q.dtype}; the pools hold {k_seq.dtype} / {v_seq.dtype}")
    if D & (D - 1) or D < 16 or B & (B - 1) or B < 16:
        raise ValueError(f"the kernel tiles powers of two >= 16: head dim {D}, block size {B}")
    if csr.host_lens[b] < index.num_keys:
        raise IndexError(f"the chunk ends at position {index.num_keys}, but sequence {b} holds "
                                 f"{csr.host_lens[b]} positions")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = q.contiguous() if q.stride(2) != 1 else q
    out = torch.empty_like(q)
    lse = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    nq = index.num_query_blocks
    _sparse_prefill_kernel[(Hq, nq)](
        q, k_seq, v_seq,
        csr.indptr, csr.indices, csr.last_page_len,
        index.block_index, index.block_count, index.column_index, index.column_count,
        out, lse,
        b, index.start, T, index.first_block, nq, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        k_seq.stride(0), k_seq.stride(1), k_seq.stride(2),
        index.block_index.stride(0), index.block_index.stride(1),
        index.column_index.stride(0), index.column_index.stride(1),
        G=Hq // Hkv, D=D, P=P, BLOCK=B, WITH_COLUMNS=index.has_columns, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
