"""The decode step's append in Triton: one new K/V row per sequence written to every layout of one layer.

A decode step appends one position to each of B sequences at one layer. In torch that is about ten
small launches per sequence (k_seq, v_seq, k_dim, three summary updates, the value sum), which on a
GPU cost far more than the bytes they move. One program per (sequence, kv head) here writes the row
to k_seq and v_seq (at the page's device slot), to k_dim (a strided column of the page), folds it
into the page's float32 key summary (a page's first row sets min = max = mean = k, a later row at
slot s updates min, max and the running mean (mean * s + k) / (s + 1)), and adds v to the
sequence's float32 value sum, which it finds by address (each sequence keeps its own tensor).
Torch reference: kvcache.store.page_pool.PagePool.append_rows, and value_sum += v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_rows_kernel(
    k_ptr, v_ptr, rows_ptr, kseq_ptr, vseq_ptr, kdim_ptr, summary_ptr,
    B,
    s_kb, s_kh, s_vb, s_vh,
    s_seq_n, s_seq_h, s_seq_p, s_dim_n, s_dim_h, s_dim_d, s_sum_n, s_sum_h, s_sum_r,
    D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # h * s_dim_h passes 2^31 in a large pool (k_dim's head axis is outermost)
    # rows [4, B] int64: page id, device slot of the page's K/V, row within the page, value sum address
    page = tl.load(rows_ptr + b)
    kv_slot = tl.load(rows_ptr + B + b)
    slot = tl.load(rows_ptr + 2 * B + b)
    offs_d = tl.arange(0, D)
    value_sum = tl.load(rows_ptr + 3 * B + b).to(tl.pointer_type(tl.float32)) + h * D + offs_d
    k = tl.load(k_ptr + b * s_kb + h * s_kh + offs_d)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + offs_d)
    seq_row = kv_slot * s_seq_n + h * s_seq_h + slot * s_seq_p + offs_d
    tl.store(kseq_ptr + seq_row, k)
    tl.store(vseq_ptr + seq_row, v)
    tl.store(kdim_ptr + page * s_dim_n + h * s_dim_h + offs_d * s_dim_d + slot, k)
    summary = summary_ptr + page * s_sum_n + h * s_sum_h + offs_d
    kf = k.to(tl.float32)
    first = slot == 0
    later = (offs_d * 0 + slot) > 0  # a vector mask: the page's summary is read only after its first row
    old_min = tl.load(summary, mask=later, other=0.0)
    old_max = tl.load(summary + s_sum_r, mask=later, other=0.0)
    old_mean = tl.load(summary + 2 * s_sum_r, mask=later, other=0.0)
    s = slot.to(tl.float32)
    tl.store(summary, tl.where(first, kf, tl.minimum(old_min, kf)))
    tl.store(summary + s_sum_r, tl.where(first, kf, tl.maximum(old_max, kf)))
    tl.store(summary + 2 * s_sum_r, tl.where(first, kf, old_mean * (s / (s + 1.0)) + kf * (1.0 / (s + 1.0))))
    tl.store(value_sum, tl.load(value_sum) + v.to(tl.float32))


def append_rows_triton(
    k_seq: torch.Tensor, v_seq: torch.Tensor, k_dim: torch.Tensor, k_summary: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
) -> None:
    """Write k, v [B, Hkv, d] into one layer's pool views (k_seq/v_seq [Nkv, Hkv, P, d], k_dim [N, Hkv, d, P],
    k_summary [N, Hkv, 3, d] float32) at rows [4, B] int64 on k's device = (page id, device slot, row in
    page, address of the sequence's float32 value sum [Hkv, d] of this layer, contiguous), adding v to it."""
    B, Hkv, D = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1 or k_seq.stride(3) != 1 or k_dim.stride(3) != 1 \
            or k_summary.stride(3) != 1 or D & (D - 1) or rows.dtype != torch.int64 or rows.shape != (4, B):
        raise ValueError("append_rows_triton: rows [4, B] int64, tensors contiguous in d, d a power of two")
    _append_rows_kernel[(B, Hkv)](
        k, v, rows, k_seq, v_seq, k_dim, k_summary,
        B,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_seq.stride(0), k_seq.stride(1), k_seq.stride(2), k_dim.stride(0), k_dim.stride(1), k_dim.stride(2),
        k_summary.stride(0), k_summary.stride(1), k_summary.stride(2),
        D=D, num_warps=1,
    )
