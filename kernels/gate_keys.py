"""A page gate's key of one decode step's last pages, in one Triton launch.

After a decode step appends a row, the gate's key of each sequence's last page changes (docs/sparse-attention.md
§3): pool the page's keys (for a pre-RoPE gate, its held rows rotated back to position 0, then their max, min and
mean; otherwise the store's page summary), project the [3d] pool by the layer's k_weight [3d, dg] and rotate the
result to the page's index. In torch that is about twenty small launches per layer of every step, which a
captured decode step of a small model pays more for than for its attention. One program per (sequence, kv head)
here does all of it in registers. RoPE frequencies come in as tables computed by torch as the reference does
(base ** (-2i / dim) in float32), so the angles at long positions agree with it.
Torch reference: kvcache.methods.gate_store.GateKeyCache.update_step (torch path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .csr import SUMMARY_MAX, SUMMARY_MEAN, SUMMARY_MIN


@triton.jit
def _project(acc1, acc2, vec, w_ptr, row0, s_wi, offs_j, offs_g, GH: tl.constexpr):
    # acc += vec @ W[row0 : row0 + HALF] for both halves of the gate dim
    rows = (row0 + offs_j)[:, None] * s_wi
    w1 = tl.load(w_ptr + rows + offs_g[None, :]).to(tl.float32)
    w2 = tl.load(w_ptr + rows + GH + offs_g[None, :]).to(tl.float32)
    return acc1 + tl.sum(vec[:, None] * w1, axis=0), acc2 + tl.sum(vec[:, None] * w2, axis=0)


@triton.jit
def _gate_page_keys_kernel(
    kseq_ptr, summary_ptr, w_ptr, keys_ptr, pages_ptr, index_ptr, fill_ptr, model_inv_ptr, gate_inv_ptr,
    s_kn, s_kh, s_kp, s_sn, s_sh, s_sr, s_wh, s_wi, s_gn, s_gh,
    P: tl.constexpr, HALF: tl.constexpr, GH: tl.constexpr, PRE_ROPE: tl.constexpr,
    MAX_ROW: tl.constexpr, MIN_ROW: tl.constexpr, MEAN_ROW: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(pages_ptr + b).to(tl.int64)
    index = tl.load(index_ptr + b)
    offs_j = tl.arange(0, HALF)
    if PRE_ROPE:
        fill = tl.load(fill_ptr + b)
        offs_p = tl.arange(0, P)
        rows = kseq_ptr + page * s_kn + h * s_kh + offs_p[:, None] * s_kp + offs_j[None, :]
        x1 = tl.load(rows).to(tl.float32)
        x2 = tl.load(rows + HALF).to(tl.float32)
        theta = (index * P + offs_p).to(tl.float32)[:, None] * tl.load(model_inv_ptr + offs_j)[None, :]
        c, s = tl.cos(theta), tl.sin(theta)
        u1 = x1 * c + x2 * s  # rotated back by the row's position
        u2 = x2 * c - x1 * s
        held = (offs_p < fill)[:, None]
        mx1 = tl.max(tl.where(held, u1, float("-inf")), axis=0)
        mx2 = tl.max(tl.where(held, u2, float("-inf")), axis=0)
        mn1 = tl.min(tl.where(held, u1, float("inf")), axis=0)
        mn2 = tl.min(tl.where(held, u2, float("inf")), axis=0)
        me1 = tl.sum(tl.where(held, u1, 0.0), axis=0) / fill.to(tl.float32)
        me2 = tl.sum(tl.where(held, u2, 0.0), axis=0) / fill.to(tl.float32)
    else:
        base = summary_ptr + page * s_sn + h * s_sh + offs_j
        mx1 = tl.load(base + MAX_ROW * s_sr)
        mx2 = tl.load(base + MAX_ROW * s_sr + HALF)
        mn1 = tl.load(base + MIN_ROW * s_sr)
        mn2 = tl.load(base + MIN_ROW * s_sr + HALF)
        me1 = tl.load(base + MEAN_ROW * s_sr)
        me2 = tl.load(base + MEAN_ROW * s_sr + HALF)
    offs_g = tl.arange(0, GH)
    acc1 = tl.zeros((GH,), dtype=tl.float32)
    acc2 = tl.zeros((GH,), dtype=tl.float32)
    w = w_ptr + h * s_wh
    # The pool is [max, min, mean], each [d] = two halves, in k_weight's row order.
    acc1, acc2 = _project(acc1, acc2, mx1, w, 0, s_wi, offs_j, offs_g, GH)
    acc1, acc2 = _project(acc1, acc2, mx2, w, HALF, s_wi, offs_j, offs_g, GH)
    acc1, acc2 = _project(acc1, acc2, mn1, w, 2 * HALF, s_wi, offs_j, offs_g, GH)
    acc1, acc2 = _project(acc1, acc2, mn2, w, 3 * HALF, s_wi, offs_j, offs_g, GH)
    acc1, acc2 = _project(acc1, acc2, me1, w, 4 * HALF, s_wi, offs_j, offs_g, GH)
    acc1, acc2 = _project(acc1, acc2, me2, w, 5 * HALF, s_wi, offs_j, offs_g, GH)
    angle = index.to(tl.float32) * tl.load(gate_inv_ptr + offs_g)
    c, s = tl.cos(angle), tl.sin(angle)
    out = keys_ptr + page * s_gn + h * s_gh + offs_g
    out_dtype = keys_ptr.dtype.element_ty
    tl.store(out, (acc1 * c - acc2 * s).to(out_dtype))
    tl.store(out + GH, (acc2 * c + acc1 * s).to(out_dtype))


def rope_inverse_frequencies(dim: int, base: float, device: torch.device) -> torch.Tensor:
    """base ** (-2i / dim) for i < dim / 2, float32, as the gate's torch RoPE computes them."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def gate_page_keys_triton(
    k_seq: torch.Tensor, summary: torch.Tensor, k_weight: torch.Tensor, keys: torch.Tensor,
    page_ids: torch.Tensor, indexes: torch.Tensor, fills: torch.Tensor,
    model_inv: torch.Tensor | None, gate_inv: torch.Tensor,
) -> None:
    """Write keys[page_ids[b]] [Hkv, dg] of pages at indexes [B] holding fills [B] rows: from k_seq [N, Hkv, P, d]
    (a pre-RoPE gate: model_inv, the model's RoPE frequencies [d/2]) or from summary [N, Hkv, 3, d] float32
    (model_inv None), through k_weight [Hkv, 3d, dg], rotated by gate_inv [dg/2] at the page's index."""
    B = page_ids.shape[0]
    Hkv, P, d = k_seq.shape[1], k_seq.shape[2], k_seq.shape[3]
    dg = keys.shape[-1]
    if B == 0:
        return
    pre_rope = model_inv is not None
    _gate_page_keys_kernel[(B, Hkv)](
        k_seq, summary, k_weight, keys, page_ids, indexes, fills, model_inv if pre_rope else gate_inv, gate_inv,
        k_seq.stride(0), k_seq.stride(1), k_seq.stride(2), summary.stride(0), summary.stride(1), summary.stride(2),
        k_weight.stride(0), k_weight.stride(1), keys.stride(0), keys.stride(1),
        P=P, HALF=d // 2, GH=dg // 2, PRE_ROPE=pre_rope,
        MAX_ROW=SUMMARY_MAX, MIN_ROW=SUMMARY_MIN, MEAN_ROW=SUMMARY_MEAN, num_warps=4,
    )
