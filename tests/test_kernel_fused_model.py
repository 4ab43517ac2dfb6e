"""The model's GPU path (fused Q/K/V and gate/up matmuls, the residual adds folded into the norms, Triton RoPE and
SwiGLU) against its plain-torch path, run here on the CPU under the Triton interpreter."""

import pytest
import torch
from kernel_support import INTERPRETED

from kvcache.engine import model as model_module
from kvcache.engine.config import ModelConfig
from kvcache.engine.model import random_model
from kvcache.engine.prefill import causal_attention

CONFIG = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=72, num_layers=3, num_heads=6,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def full_attention(layer, q, k, v):
    return torch.stack([causal_attention(q[b], k[b], v[b]) for b in range(q.shape[0])])


def logits(model, ids, positions):
    return model(ids, positions, full_attention)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 5)])
def test_the_fused_path_matches_the_torch_path(monkeypatch, B, T):
    model = random_model(CONFIG, seed=4).to(DEVICE)
    gen = torch.Generator().manual_seed(B * 10 + T)
    ids = torch.randint(0, CONFIG.vocab_size, (B, T), generator=gen).to(DEVICE)
    positions = torch.arange(7, 7 + T).expand(B, T).to(DEVICE)
    monkeypatch.setattr(model_module, "use_kernels", lambda x: False)
    expected = logits(model, ids, positions)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.projections_fused
    model.fuse_projections()
    assert model.projections_fused
    # Fusing keeps the parameters, their names and values: only their storage is shared.
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(logits(model, ids, positions), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(model_module, "use_kernels", lambda x: True)
    torch.testing.assert_close(logits(model, ids, positions), expected, rtol=1e-4, atol=1e-4)


def test_a_later_move_undoes_the_fusion_and_the_model_still_computes_the_same():
    model = random_model(CONFIG, seed=5).fuse_projections()
    ids, positions = torch.tensor([[3, 1, 4]]), torch.arange(3)[None]
    expected = logits(model, ids, positions)
    moved = model.to(torch.float64).to(torch.float32)  # every parameter gets its own storage
    assert not moved.projections_fused
    torch.testing.assert_close(logits(moved, ids, positions), expected, rtol=1e-5, atol=1e-5)
    # A load into the fused views writes the fused weight the matmul reads.
    fused = random_model(CONFIG, seed=6).fuse_projections()
    fused.load_state_dict(model.state_dict())
    assert fused.projections_fused
    torch.testing.assert_close(logits(fused, ids, positions), expected, rtol=1e-5, atol=1e-5)
