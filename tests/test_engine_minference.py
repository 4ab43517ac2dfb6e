"""MInference prefill in the engine: with causal patterns it is dense prefill; the served variants (index from
the store, attention from the store) give what the local one gives, in-process and over gRPC; generate and
the command line use it; the real SmolLM2 with its searched patterns answers as with dense prefill."""

from __future__ import annotations

import json

import pytest
import torch
from service_support import STORE, serving, store_config
from test_engine_model import one_torch_thread  # noqa: F401 (an autouse fixture)

from kvcache import InProcessClient
from kvcache.clients.remote import RemoteClient
from kvcache.engine.config import ModelConfig
from kvcache.engine.generate import generate
from kvcache.engine.minference_prefill import MInferencePrefill
from kvcache.engine.model import random_model
from kvcache.engine.patterns import PatternConfig
from kvcache.engine.prefill import prefill
from kvcache.prefill.serving import CAUSAL, HeadPattern

CONFIG = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=STORE["num_layers"],
                     num_heads=4, num_kv_heads=STORE["num_kv_heads"], head_dim=STORE["head_dim"], rope_theta=1000.0,
                     max_position_embeddings=256)
PROMPT = torch.randint(0, 101, (90,), generator=torch.Generator().manual_seed(2)).tolist()
B = 16
SPARSE = [HeadPattern("a_shape", n_init=16, n_local=16), HeadPattern("vertical_slash", n_vertical=30, n_slash=50),
          HeadPattern("block_sparse", top_k=2), CAUSAL]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=5)


def patterns(per_head) -> PatternConfig:
    return PatternConfig("tiny", CONFIG.num_layers, CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim,
                         [list(per_head) for _ in range(CONFIG.num_layers)])


def run(model, client, attention=None, chunk_size: int = 32):
    """Prefill PROMPT; the logits and every layer's cached K/V."""
    seq = client.create().seq_id
    kwargs = {} if attention is None else {"attention": attention}
    logits = prefill(model, client, seq, PROMPT, chunk_size=chunk_size, **kwargs)
    rows = torch.arange(len(PROMPT)).expand(CONFIG.num_kv_heads, -1)
    cache = [client.fetch(seq, layer, "rows", rows).tensors for layer in range(CONFIG.num_layers)]
    client.free(seq)
    return logits, cache


def assert_same(a, b, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for (ka, va), (kb, vb) in zip(a[1], b[1]):
        torch.testing.assert_close(ka, kb, rtol=tol, atol=tol)
        torch.testing.assert_close(va, vb, rtol=tol, atol=tol)


@pytest.mark.parametrize("served", ["none", "index", "attention"])
def test_causal_patterns_give_the_dense_prefill_logits_and_cache(model, served):
    dense = run(model, InProcessClient(store_config()))
    attention = MInferencePrefill(patterns([CAUSAL] * 4), served=served, block_size=B)
    assert_same(run(model, InProcessClient(store_config()), attention), dense)
    assert attention.density == 1.0
    assert attention.calls == CONFIG.num_layers * 3  # 90 positions in chunks of 32


def test_sparse_patterns_compute_fewer_pairs_and_change_the_logits(model):
    dense = run(model, InProcessClient(store_config()))
    attention = MInferencePrefill(patterns(SPARSE), block_size=B)
    sparse = run(model, InProcessClient(store_config()), attention)
    assert 0.3 < attention.density < 0.9
    assert not torch.allclose(sparse[0], dense[0], atol=1e-3)


def test_served_index_and_served_attention_give_what_the_engine_computes_itself(model):
    local = run(model, InProcessClient(store_config()), MInferencePrefill(patterns(SPARSE), block_size=B))
    for served in ("index", "attention"):
        assert_same(run(model, InProcessClient(store_config()),
                        MInferencePrefill(patterns(SPARSE), served=served, block_size=B)), local)


def test_over_grpc_the_served_variants_give_the_in_process_answer(model):
    local = run(model, InProcessClient(store_config()), MInferencePrefill(patterns(SPARSE), block_size=B))
    with serving() as server, RemoteClient(server.target, timeout=30) as remote:
        for served in ("index", "attention"):
            attention = MInferencePrefill(patterns(SPARSE), served=served, block_size=B)
            assert_same(run(model, remote, attention), local)
        stats = remote.stats()["rpcs"]
        assert stats["SparseIndex"]["calls"] == stats["SparsePrefill"]["calls"] == CONFIG.num_layers * 3
        assert "Append" in stats  # one append per layer and chunk


def test_a_reused_prefix_and_decoding_after_a_minference_prefill(model):
    client = InProcessClient(store_config(page_size=4))
    attention = MInferencePrefill(patterns(SPARSE), served="attention", block_size=B)
    first = generate(model, client, [PROMPT], max_new_tokens=3, prefill_attention=attention)
    again = generate(model, client, [PROMPT], max_new_tokens=3, prefill_attention=attention)
    assert again.reused_tokens > 0  # full pages written layer by layer still enter the prefix cache
    assert again.tokens == first.tokens


def test_smollm2_with_its_searched_patterns_answers_as_with_dense_prefill(tmp_path, capsys):
    """The real model, one short chat through `kvcache generate --prefill minference` (about 20 s on 2 cores)."""
    from kvcache.cli import main

    answers = {}
    for how in ("dense", "minference"):
        out = tmp_path / f"{how}.json"
        code = main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "8",
                     "--prefill", how, "--json", str(out)])
        assert code == 0, capsys.readouterr().err
        answers[how] = json.loads(out.read_text())
    assert answers["minference"]["prefill"] == "minference"
    assert 0 < answers["minference"]["prefill_density"] <= 1
    assert answers["minference"]["answer"] == answers["dense"]["answer"]
