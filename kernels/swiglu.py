"""The MLP's SwiGLU activation, silu(gate) * up, in one Triton kernel that reads a fused gate/up projection output.

With the gate and up projections fused into one matmul (its output [..., 2I]: the gate in the first I columns, up
in the last I), plain torch still launches the silu and the multiply separately, the multiply re-reading what the
silu wrote, and a float32 computation adds casts on top. One program per (row, block of columns) here reads both
halves once, computes in float32 and rounds once. Torch reference: silu_mul_reference,
(F.silu(gate.float()) * up.float()).to(dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inner, s_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # a long prefill's rows * 2I can pass 2^31
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    g = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * s_x + inner + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * inner + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[..., :I]) * gate_up[..., I:] as a new contiguous [..., I] tensor in gate_up's dtype."""
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_mul: the last dim ({two_i}) must hold the gate and up halves, so be even")
    inner = two_i // 2
    x = gate_up.reshape(-1, two_i)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((*gate_up.shape[:-1], inner), dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] == 0 or inner == 0:
        return out
    BLOCK = min(1024, triton.next_power_of_2(inner))
    _silu_mul_kernel[(x.shape[0], triton.cdiv(inner, BLOCK))](x, out, inner, x.stride(0), BLOCK=BLOCK,
                                                          num_warps=min(max(BLOCK // 256, 1), 4))
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul in plain torch: computed in float32, rounded once to gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype).contiguous()
