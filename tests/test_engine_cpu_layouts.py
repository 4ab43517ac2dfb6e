"""Llama.for_decoding on the CPU: fused projections, each matmul weight stored in the memory order chosen for its
shape, and the same parameters, values and logits as the model it came from."""

import pytest
import torch

from kvcache.engine import model as model_module
from kvcache.engine.config import ModelConfig
from kvcache.engine.model import random_model
from kvcache.engine.prefill import causal_attention

CONFIG = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=72, num_layers=3, num_heads=6,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)


def full_attention(layer, q, k, v):
    return torch.stack([causal_attention(q[b], k[b], v[b]) for b in range(q.shape[0])])


def logits(model, B, T, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG.vocab_size, (B, T), generator=gen)
    positions = torch.arange(3, 3 + T).expand(B, T)
    return model(ids, positions, full_attention)


def column_major(t):
    return t.stride(0) == 1


@pytest.mark.parametrize("wide_first", [True, False])
def test_layouts_follow_the_measurement_per_shape_and_change_no_value(monkeypatch, wide_first):
    model = random_model(CONFIG, seed=3)
    expected = [logits(model, 1, 1, 0), logits(model, 2, 5, 1)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    measured = []

    def faster(weight, trials):  # column-major for outputs wider than inputs (or the reverse): no timing in a test
        measured.append(tuple(weight.shape))
        wide = weight.shape[0] > weight.shape[1]
        return wide if wide_first else not wide

    monkeypatch.setattr(model_module, "_column_major_faster", faster)
    assert model.for_decoding() is model
    assert len(measured) == len(set(measured))  # each shape measured once
    assert model.projections_fused
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for fused, parts in ((a.qkv, (a.q_proj, a.k_proj, a.v_proj)), (m.gate_up, (m.gate_proj, m.up_proj))):
            want = (fused.shape[0] > fused.shape[1]) == wide_first
            assert column_major(fused) == want
            assert all(column_major(p.weight) == want for p in parts)
            assert parts[0].weight.data_ptr() == fused.data_ptr()  # the parts are still views of the fused weight
        down = m.down_proj.weight
        assert column_major(down) == ((down.shape[0] > down.shape[1]) == wide_first)
    embed = model.model.embed_tokens.weight  # tied: the output matrix, read by the logits
    assert column_major(embed) == wide_first
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for got, want in zip([logits(model, 1, 1, 0), logits(model, 2, 5, 1)], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_measurement_times_both_orders_and_names_one(monkeypatch):
    weight = torch.randn(40, 8)
    calls = []
    real_linear = model_module.F.linear

    def linear(x, w):
        calls.append(column_major(w))
        return real_linear(x, w)

    monkeypatch.setattr(model_module.F, "linear", linear)
    assert model_module._column_major_faster(weight, trials=2) in (True, False)
    assert True in calls and False in calls


def test_preparing_twice_keeps_the_layouts_and_the_logits():
    model = random_model(CONFIG, seed=5).for_decoding()
    strides = {k: v.stride() for k, v in model.state_dict().items()}
    before = logits(model, 2, 3, 2)
    model.for_decoding()
    assert {k: v.stride() for k, v in model.state_dict().items()} == strides
    torch.testing.assert_close(logits(model, 2, 3, 2), before, rtol=0, atol=0)
