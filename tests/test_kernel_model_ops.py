"""The decoder's own ops in Triton (kvcache.kernels.rms_norm, rope, swiglu) against their torch references, and the
references against the model's plain-torch ops (kvcache.engine.model) in float32.

Inputs are random, of odd and power-of-two sizes, and where the model hands the kernels views of a fused
projection output, such views; outputs are allocated poisoned (NaN), so an element never written fails.
"""

import pytest
import torch
from kernel_support import INTERPRETED, TOL, poisoned_allocations

from kvcache.engine.model import RMSNorm, apply_rope, rope_tables
from kvcache.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
from kvcache.kernels.rope import rope_qk, rope_qk_reference
from kvcache.kernels.swiglu import silu_mul, silu_mul_reference

DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(gen, shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any(), "an output element was never written"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("lead,hidden,strided", [((1,), 64, False), ((2, 3), 576, False), ((3, 2), 100, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(lead, hidden, strided, dtype, with_residual):
    gen = torch.Generator().manual_seed(hidden + len(lead))
    # strided: x and the residual are every other hidden-wide slice of a wider tensor, as a fused output's would be
    x = randn(gen, (*lead, 2 * hidden), dtype)[..., hidden:] if strided else randn(gen, (*lead, hidden), dtype)
    residual = randn(gen, (*lead, hidden), dtype) if with_residual else None
    weight = (1 + 0.1 * randn(gen, (hidden,))).to(torch.float32 if hidden == 100 else dtype)  # any weight dtype
    with poisoned_allocations():
        normed, h = add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_h = add_rms_norm_reference(x, residual, weight, 1e-6)
    if dtype == torch.bfloat16 and INTERPRETED:  # the interpreter truncates float32 to bfloat16 (a GPU rounds)
        assert_close(h, ref_h, dtype)
    else:
        torch.testing.assert_close(h, ref_h, rtol=0, atol=0)  # one float32 add rounded once: exact
    assert_close(normed, ref_normed, dtype)
    if residual is None:
        assert h is x  # the stream is unchanged: nothing copied


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_reference_is_the_model_s_norm_of_the_sum(with_residual):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(gen, (96,)))
    x = randn(gen, (2, 3, 96))
    residual = randn(gen, (2, 3, 96)) if with_residual else None
    model_h = x + residual if with_residual else x  # the model's residual add, in the activation dtype
    normed, h = add_rms_norm_reference(x, residual, norm.weight.detach(), norm.eps)
    assert torch.equal(h, model_h)
    assert torch.equal(normed, norm(model_h).detach())


def fused_qk(gen, B, T, Hq, Hkv, d, dtype):
    """q, k as the model's fused QKV projection output [B, T, (Hq + 2 Hkv) d] viewed as heads: strided views."""
    qkv = randn(gen, (B, T, (Hq + 2 * Hkv) * d), dtype)
    q = qkv[..., : Hq * d].view(B, T, Hq, d)
    k = qkv[..., Hq * d : (Hq + Hkv) * d].view(B, T, Hkv, d)
    return q, k


def tables(gen, B, T, d, dtype):
    positions = torch.randint(0, 4096, (B, T), generator=gen).to(DEVICE)
    return rope_tables(positions, d, 10000.0, dtype)


@pytest.mark.parametrize("B,T,Hq,Hkv,d", [(1, 1, 4, 2, 16), (2, 5, 6, 2, 64), (3, 1, 8, 1, 128), (1, 5, 3, 3, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_matches_reference(B, T, Hq, Hkv, d, dtype):
    gen = torch.Generator().manual_seed(B * 1000 + T * 100 + d)
    q, k = fused_qk(gen, B, T, Hq, Hkv, d, dtype)
    # The tables in float32 for one case (their dtype is the caller's), [B, T, d] for another.
    cos, sin = tables(gen, B, T, d, torch.float32 if Hkv == 1 else dtype)
    if T == 5 and Hq == 3:
        cos, sin = cos[:, :, 0], sin[:, :, 0]
    with poisoned_allocations():
        q_out, k_out = rope_qk(q, k, cos, sin)
    q_ref, k_ref = rope_qk_reference(q, k, cos, sin)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)


def test_rope_reference_is_the_model_s_apply_rope_in_float32():
    gen = torch.Generator().manual_seed(2)
    q, k = fused_qk(gen, 2, 3, 4, 2, 32, torch.float32)
    cos, sin = tables(gen, 2, 3, 32, torch.float32)
    q_ref, k_ref = rope_qk_reference(q, k, cos, sin)
    assert torch.equal(q_ref, apply_rope(q, cos, sin))
    assert torch.equal(k_ref, apply_rope(k, cos, sin))


@pytest.mark.parametrize("lead,inner,strided", [((3,), 7, False), ((2, 3), 1536, False), ((1, 1), 1536, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(lead, inner, strided, dtype):
    gen = torch.Generator().manual_seed(inner + len(lead))
    # strided: the gate/up columns are a slice of a wider output (rows not 2I apart)
    gate_up = randn(gen, (*lead, 3 * inner), dtype)[..., inner:] if strided else randn(gen, (*lead, 2 * inner), dtype)
    with poisoned_allocations():
        out = silu_mul(gate_up)
    assert out.shape == (*lead, inner) and out.is_contiguous()
    assert_close(out, silu_mul_reference(gate_up), dtype)


def test_silu_mul_reference_is_the_model_s_activation_in_float32():
    gen = torch.Generator().manual_seed(3)
    gate, up = randn(gen, (4, 9)), randn(gen, (4, 9))
    assert torch.equal(silu_mul_reference(torch.cat((gate, up), dim=-1)), torch.nn.functional.silu(gate) * up)
