"""Rotary position embedding of q and k in one Triton launch, in Hugging Face's half-split layout.

The model's plain-torch rotation (kvcache.engine.model.apply_rope) is, for each of q and k, a negation, a
concatenation, two multiplies and an add: about ten launches per layer of a decode step for a few kilobytes.
One program per (token, head) here rotates one head of q or of k, pairs (i, i + d/2), reading q and k where the
projection left them (views of one fused projection output: any strides) and writing contiguous outputs.
It computes in float32 and rounds once, as rope_qk_reference does; the model's apply_rope computes in the
activation dtype instead, so in bfloat16 (or float16) the two differ by that dtype's rounding, and in float32 they
are equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_head(src, dst, cos, sin, s_d, s_cd, HALF: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    x1 = tl.load(src + offs * s_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + (offs + HALF) * s_d, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos + offs * s_cd, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + (offs + HALF) * s_cd, mask=mask, other=0.0).to(tl.float32)
    n1 = tl.load(sin + offs * s_cd, mask=mask, other=0.0).to(tl.float32)
    n2 = tl.load(sin + (offs + HALF) * s_cd, mask=mask, other=0.0).to(tl.float32)
    out_dtype = dst.dtype.element_ty
    # out = x * cos + cat(-x2, x1) * sin
    tl.store(dst + offs, (x1 * c1 - x2 * n1).to(out_dtype), mask=mask)
    tl.store(dst + HALF + offs, (x2 * c2 + x1 * n2).to(out_dtype), mask=mask)


@triton.jit
def _rope_qk_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    T, HQ, HKV,
    s_qb, s_qt, s_qh, s_qd, s_kb, s_kt, s_kh, s_kd, s_cb, s_ct, s_cd,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = bt // T
    t = bt % T
    cos = cos_ptr + b * s_cb + t * s_ct
    sin = sin_ptr + b * s_cb + t * s_ct
    # Heads [0, HQ) are q's, [HQ, HQ + HKV) k's: one launch for both.
    if h < HQ:
        _rotate_head(q_ptr + b * s_qb + t * s_qt + h * s_qh, qo_ptr + (bt * HQ + h) * (2 * HALF),
                     cos, sin, s_qd, s_cd, HALF, BLOCK)
    else:
        hk = h - HQ
        _rotate_head(k_ptr + b * s_kb + t * s_kt + hk * s_kh, ko_ptr + (bt * HKV + hk) * (2 * HALF),
                     cos, sin, s_kd, s_cd, HALF, BLOCK)


def _tables(t: torch.Tensor, B: int, T: int, d: int) -> torch.Tensor:
    # [B, T, 1, d] or [B, T, d], broadcast where a dim is 1: a view, no copy.
    return (t[:, :, 0] if t.dim() == 4 else t).expand(B, T, d)


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, Hq, d] and k [B, T, Hkv, d] by cos, sin [B, T, 1, d] (or [B, T, d]); new contiguous tensors."""
    B, T, Hq, d = q.shape
    Hkv = k.shape[2]
    if d % 2 or k.shape != (B, T, Hkv, d):
        raise ValueError(f"rope_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, T, H, d] with d even")
    cos, sin = _tables(cos, B, T, d), _tables(sin, B, T, d)
    if cos.stride() != sin.stride():  # the kernel addresses both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    if B * T == 0:
        return q_out, k_out
    _rope_qk_kernel[(B * T, Hq + Hkv)](
        q, k, cos, sin, q_out, k_out,
        T, Hq, Hkv,
        *q.stride(), *k.stride(), *cos.stride(),
        HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), num_warps=1,
    )
    return q_out, k_out


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rope_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_qk in plain torch: kvcache.engine.model.apply_rope in float32, rounded once to q's and k's dtype."""
    if cos.dim() == 3:
        cos, sin = cos[:, :, None], sin[:, :, None]
    cos, sin = cos.float(), sin.float()
    return _rotate_reference(q, cos, sin).contiguous(), _rotate_reference(k, cos, sin).contiguous()
