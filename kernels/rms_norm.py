"""The decoder's residual add and RMSNorm in one Triton kernel: h = x + residual, then h / rms(h) * weight.

A decode step's pre-norm block is, in plain torch, the residual add and then about eight launches for the norm
(casts of x and the weight, square, mean, add eps, rsqrt, two multiplies, the cast back), each moving a few
kilobytes: on a GPU their launch overheads are the whole cost. One program per row here adds the residual (in
float32, rounded once to the activation dtype, as the model's own add in that dtype does), writes that sum as the
new residual stream, and normalizes it in float32. Torch reference: add_rms_norm_reference, which is
kvcache.engine.model.RMSNorm applied to x + residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, h_ptr,
    N, eps, s_x, s_res,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # a long prefill's rows * hidden can pass 2^31
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * s_res + offs, mask=mask, other=0.0)
        # Rounded to the activation dtype before the norm reads it, as the model's x + residual in that dtype is.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * N + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (hf * rstd * w).to(x.dtype), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h) * weight, h) with h = x + residual (or x where residual is None), both [..., hidden] in x.dtype."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = x2
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    # Without a residual the stream is x itself: no copy is written.
    h = x if residual is None else torch.empty_like(x2, memory_format=torch.contiguous_format)
    BLOCK = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out, h,
        hidden, eps, x2.stride(0), res2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, num_warps=min(max(BLOCK // 256, 1), 8),
    )
    return out.view(x.shape), h if residual is None else h.view(x.shape)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm in plain torch, with the operations of kvcache.engine.model.RMSNorm in their order."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (hf * weight.float()).to(x.dtype), h
