"""`kvcache train-gate` on a tiny random model: the ground truth is the model's attention mass per page,
and a few steps of training lower the KL on held-out positions (a window the gate never saw)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache.engine.config import ModelConfig
from kvcache.engine.model import random_model
from kvcache.engine.train_gate import (
    capture,
    gate_for,
    gate_scores,
    kl_loss,
    mass_recall,
    quest_scores,
    recall_report,
    train,
)
from kvcache.methods.gate_model import gate_logits, gate_page_scores
from kvcache.methods.gate_store import load_gate, save_gate

CONFIG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     head_dim=16)
P = 4


def _ids(n, seed):
    # Repeating motifs give the random model's attention some structure across pages.
    gen = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, CONFIG.vocab_size, (12,), generator=gen)
    noise = torch.randint(0, CONFIG.vocab_size, (n,), generator=gen)
    take = torch.rand(n, generator=gen) < 0.5
    return torch.where(take, motif.repeat(n // 12 + 1)[:n], noise).tolist()


def test_ground_truth_is_the_attention_mass_per_page_averaged_over_the_group():
    torch.set_num_threads(1)
    model = random_model(CONFIG, seed=3)
    cap = capture(model, _ids(48, 0), P, queries=5)
    L, Hkv, Tq, n = cap.gt.shape
    assert (L, Hkv, n) == (2, 2, 12) and Tq == 5
    for r, t in enumerate(cap.positions.tolist()):
        row = cap.gt[:, :, r]
        torch.testing.assert_close(row.sum(-1), torch.ones(L, Hkv))  # a distribution over pages
        assert torch.all(row[..., t // P + 1 :] == 0)  # no mass on future pages
    assert torch.all(cap.positions >= 3 * P)


def test_the_max_target_is_the_page_max_of_the_attention_over_the_group():
    torch.set_num_threads(1)
    model = random_model(CONFIG, seed=3)
    ids = _ids(48, 0)
    cap = capture(model, ids, P, queries=5)
    assert cap.target("mass") is cap.gt
    # Recompute layer 0's attention rows from its q and pooled keys' source: the model's own k at layer 0.
    ks = []

    def attend(layer, q, k, v):
        if layer == 0:
            ks.append(k[0].float())
        from kvcache.engine.prefill import causal_attention
        return causal_attention(q[0], k[0], v[0])[None]

    model(torch.tensor([ids]), torch.arange(48)[None], attend, last_only=True)
    k = ks[0].repeat_interleave(3, dim=1)  # [T, Hq, d]
    q = cap.q[0].view(5, 2, 3, 16).flatten(1, 2)  # [Tq, Hq, d]
    logits = torch.einsum("thd,shd->hts", q, k) / 4.0
    causal = torch.arange(48)[None, :] <= cap.positions[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # [Hq, Tq, T]
    want = probs.view(2, 3, 5, 12, P).amax(-1).amax(1)  # page max, then max over the group
    torch.testing.assert_close(cap.target("max")[0], want)
    assert not torch.allclose(cap.target("max"), cap.target("mass"))


@pytest.mark.parametrize("target", ["mass", "max"])
def test_a_few_steps_lower_the_held_out_kl_and_the_trained_gate_loads_and_scores(tmp_path, target):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = random_model(CONFIG, seed=3)
    gate = gate_for(CONFIG, P, gate_dim=16)  # pre-RoPE: captures rotate q and keys back with the model's base
    base = gate.shape.model_rope_base
    assert base == CONFIG.rope_theta
    train_caps = [capture(model, _ids(128, s), P, queries=96, seed=s, model_rope_base=base) for s in (1, 2)]
    held = [capture(model, _ids(128, 9), P, queries=96, seed=9, model_rope_base=base)]
    with torch.no_grad():
        before = float(kl_loss(gate, held[0], target=target))
    curve = train(gate, train_caps, held, steps=60, lr=1e-2, batch=64, eval_every=20, log=lambda *_: None,
                  target=target)
    with torch.no_grad():
        after = float(kl_loss(gate, held[0], target=target))
    assert curve["held_out"][0] == before and math.isclose(curve["held_out"][-1], after, rel_tol=1e-6)
    assert after < 0.8 * before, (before, after)
    path = save_gate(gate, tmp_path / "tiny.safetensors")
    back = load_gate(path, {"num_layers": 2, "num_kv_heads": 2, "group": 3, "head_dim": 16, "page_size": P})
    assert back.shape == gate.shape
    q, keys = torch.randn(2, 3, 16), torch.randn(2, 27, 16)
    torch.testing.assert_close(gate_page_scores(back.layer(1), q, None, keys),
                               gate_page_scores(gate.layer(1), q, None, keys).detach())


def test_a_pre_rope_gate_scores_at_decode_as_it_was_trained():
    """Training sees q and pooled keys rotated back at capture; decode rotates the store's (rotated) q and keys
    back itself. For a captured query, the logits over the full pages before its own are the same both ways."""
    torch.set_num_threads(1)
    model = random_model(CONFIG, seed=3)
    gate = gate_for(CONFIG, P, gate_dim=16, seed=2)
    ids = _ids(64, 5)
    cap = capture(model, ids, P, queries=12, seed=5, model_rope_base=gate.shape.model_rope_base)
    assert cap.rotated is not None and not torch.allclose(cap.rotated[0], cap.q)
    stored = {}

    def keep(layer, q, k, v):
        from kvcache.engine.prefill import causal_attention

        stored[layer] = (q[0], k[0])
        return causal_attention(q[0], k[0], v[0])[None]

    model(torch.tensor([ids]), torch.arange(64)[None], keep, last_only=True)
    with torch.no_grad():
        trained = gate_scores(gate, cap)  # log-probabilities over the pages between, [L, Hkv, Tq, n]
    for layer in range(CONFIG.num_layers):
        q, k = stored[layer]
        for row, t in enumerate(cap.positions.tolist()):
            own = t // P
            served = gate_logits(gate.layer(layer), q[t].view(2, 3, 16), None, k[: t + 1].transpose(0, 1))
            middle = slice(1, own)  # both softmaxes over these pages: compare log-probabilities
            want = trained[layer, :, row, middle]
            torch.testing.assert_close(torch.log_softmax(served[:, middle], -1), want, rtol=1e-4, atol=1e-4)


def test_mass_recall_is_one_with_every_page_and_best_for_the_ground_truth_order():
    torch.set_num_threads(1)
    model = random_model(CONFIG, seed=3)
    cap = capture(model, _ids(96, 4), P, queries=40, seed=4)
    gate = gate_for(CONFIG, P, gate_dim=16)
    assert abs(mass_recall(quest_scores(cap, CONFIG.head_dim), cap, 1.0) - 1) < 1e-5
    for f in (0.5, 0.25):
        best = mass_recall(cap.gt, cap, f)
        assert best >= mass_recall(quest_scores(cap, CONFIG.head_dim), cap, f) - 1e-6
        assert best >= mass_recall(gate_scores(gate, cap), cap, f) - 1e-6
    rows = recall_report(gate, [cap], CONFIG.head_dim, fractions=(0.5,))
    assert set(rows[0]) == {"fraction_of_pages", "gate", "quest", "oracle"}


def test_training_windows_start_after_the_tokens_the_eval_scores_and_must_fit():
    from kvcache.engine.train_gate import EVAL_TOKENS, windows

    ids = list(range(EVAL_TOKENS + 3 * 100))
    got = windows(ids, 100, 3, EVAL_TOKENS)
    assert [w[0] for w in got] == [EVAL_TOKENS, EVAL_TOKENS + 100, EVAL_TOKENS + 200]
    assert all(len(w) == 100 for w in got)
    with pytest.raises(ValueError, match="do not fit"):
        windows(ids, 100, 4, EVAL_TOKENS)
