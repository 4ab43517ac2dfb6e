"""kvcache.kernels.gate_keys against its torch reference (GateKeyCache.update_step's torch path): the gate keys of a
decode step's last pages, for a pre-RoPE gate (rows rotated back, pooled over the held rows) and one on the store's
summaries, at page fills from one row to full, page indexes far into a sequence, GQA and both key dtypes."""

import pytest
import torch
from kernel_support import INTERPRETED

from kvcache.kernels.gate_keys import gate_page_keys_triton
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import GateKeyCache

DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
N = 12  # pages in the pool


@pytest.mark.parametrize("Hkv,d,P,dg", [(1, 16, 4, 16), (2, 64, 16, 32), (3, 32, 8, 128)])
@pytest.mark.parametrize("pre_rope", [True, False], ids=["pre_rope", "rotated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_torch_update(Hkv, d, P, dg, pre_rope, dtype):
    gen = torch.Generator().manual_seed(Hkv * 100 + d + P)
    shape = GateShape(2, Hkv, 2, d, P, gate_dim=dg, rope_base=500.0, model_rope_base=10000.0 if pre_rope else 0.0)
    gate = PageGate(shape, seed=3).to(DEVICE)
    summary = torch.randn((2, N, Hkv, 3, d), generator=gen).to(DEVICE)
    k_seq = torch.randn((N, Hkv, P, d), generator=gen).to(dtype).to(DEVICE)
    want_cache = GateKeyCache(gate, summary, dtype)
    want_cache._step_kernel = False  # the torch path: the reference
    got_keys = torch.full_like(want_cache.keys[1], float("nan"))
    page_ids = torch.tensor([7, 2, 11], device=DEVICE)
    indexes = torch.tensor([0, 5, 8191], device=DEVICE)  # a first page, and one 131K positions in
    fills = torch.tensor([1, P, max(1, P // 2)], device=DEVICE)
    want_cache.update_step(1, k_seq, page_ids, indexes, fills)
    gate_page_keys_triton(k_seq, summary[1], gate.layer(1).k_weight, got_keys, page_ids, indexes, fills,
                          want_cache._model_inv, want_cache._gate_inv)
    rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-3, 2e-3)
    torch.testing.assert_close(got_keys[page_ids].float(), want_cache.keys[1, page_ids].float(), rtol=rtol,
                               atol=atol)
    others = [p for p in range(N) if p not in page_ids.tolist()]
    assert torch.isnan(got_keys[others].float()).all()  # no other page's key is written
