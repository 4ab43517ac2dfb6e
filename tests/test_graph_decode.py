"""Decode steps replayed from captured CUDA graphs (engine/graph_decode.py) give the tokens and logits of the eager
step, re-capture when a sequence outgrows the graph's capacity, and are refused, with the reason, where they cannot
apply."""

from __future__ import annotations

import pytest
import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import AttentionSpec, decode_step
from kvcache.engine.graph_decode import GraphDecoder, graph_unsupported
from kvcache.engine.model import random_model

CONFIG = ModelConfig(512, 128, 256, 3, 4, 2, 32, max_position_embeddings=8192)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _client(device: str, **store) -> InProcessClient:
    return InProcessClient(KVCacheConfig(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, page_size=16,
                                         dtype=torch.float32, device=device, **{"device_pages": 512, **store}))


def test_a_step_that_cannot_be_captured_says_why():
    model = random_model(CONFIG)
    assert "CUDA" in graph_unsupported(_client("cpu"), model)
    assert "not in this process" in graph_unsupported(object(), model)
    with pytest.raises(ValueError, match="cannot be captured"):
        GraphDecoder(model, _client("cpu"))


def _prefilled(client, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for n in lengths:
        sid = client.create().seq_id
        kv = torch.randn((2, CONFIG.num_layers, n, CONFIG.num_kv_heads, CONFIG.head_dim), generator=gen)
        client.append(sid, kv[0], kv[1])
        ids.append(sid)
    return ids


def _gate():
    from kvcache.methods.gate_model import GateShape, PageGate

    # Random weights, pre-RoPE as `kvcache train-gate` makes them: the page keys are read back from the pool.
    return PageGate(GateShape(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.num_heads // CONFIG.num_kv_heads,
                              CONFIG.head_dim, 16, model_rope_base=CONFIG.rope_theta), seed=3)


@NO_CUDA
@pytest.mark.parametrize("method,params", [("dense", {}), ("sparq", {"r": 8, "k": 32, "local_window": 8}),
                                           ("quest", {"top_pages": 4}), ("window", {"window": 24, "sinks": 4}),
                                           ("gate", {"budget": 64})],
                         ids=["dense", "sparq", "quest", "window", "gate"])
@pytest.mark.parametrize("lengths", [[1000], [1020, 37, 500]], ids=["one", "three"])
def test_graph_steps_give_the_eager_tokens_and_recapture_past_their_capacity(lengths, method, params):
    from kvcache.methods.gate_store import attach_gate, gate_key_cache

    model = random_model(CONFIG, seed=1, device="cuda")
    eager, graphed = _client("cuda"), _client("cuda")
    ids_e, ids_g = _prefilled(eager, lengths), _prefilled(graphed, lengths)
    if method == "gate":
        gate = _gate()
        attach_gate(eager.store, gate)
        attach_gate(graphed.store, gate)
    decoder = GraphDecoder(model, graphed)
    tokens = [[7] for _ in lengths]
    positions = list(lengths)
    for i in range(40):  # the longest sequence passes 1024 positions: a second graph is captured
        # With a gate, every third step runs dense: its graph too must keep the gate's page keys current.
        name = "dense" if method == "gate" and i % 3 == 0 else method
        spec = AttentionSpec(name, params if name == method else {})
        want = decode_step(model, eager, ids_e, [t[-1] for t in tokens], positions, spec).logits
        got, nbytes = decoder.step(ids_g, [t[-1] for t in tokens], positions, spec.method, spec.params)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        chosen = want.argmax(-1).tolist()
        assert got.argmax(-1).tolist() == chosen
        assert nbytes > 0
        for t, c in zip(tokens, chosen):
            t.append(c)
        positions = [p + 1 for p in positions]
    assert decoder.captures == (2 if max(lengths) + 40 > 1024 else 1) * (2 if method == "gate" else 1)
    if method == "gate":  # the page keys the graphs wrote are those the eager steps' store computed
        for a, b in zip(ids_e, ids_g):
            for layer in range(CONFIG.num_layers):
                pe = eager.store.page_table([a], layer).indices.long()
                pg = graphed.store.page_table([b], layer).indices.long()
                torch.testing.assert_close(gate_key_cache(graphed.store).keys[layer, pg],
                                           gate_key_cache(eager.store).keys[layer, pe], rtol=1e-4, atol=1e-4)
    for a, b in zip(ids_e, ids_g):
        assert eager.describe(a).lengths == graphed.describe(b).lengths
        n = eager.describe(a).length
        index = torch.arange(n).expand(CONFIG.num_kv_heads, n)
        got, want = graphed.fetch(b, 2, "rows", index).tensors, eager.fetch(a, 2, "rows", index).tensors
        assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(got, want))


@NO_CUDA
def test_a_greedy_loop_fed_its_own_tokens_on_the_device_gives_the_host_fed_tokens():
    model = random_model(CONFIG, seed=2, device="cuda")
    lengths = [1000, 300]
    by_host, by_device = _client("cuda"), _client("cuda")
    ids_h, ids_d = _prefilled(by_host, lengths), _prefilled(by_device, lengths)
    host_decoder, device_decoder = GraphDecoder(model, by_host), GraphDecoder(model, by_device)
    last, positions, host_tokens, device_tokens = [5, 9], list(lengths), [], []
    for _ in range(30):  # crosses 1024 positions: the device tokens pass from one captured graph to the next
        logits, _ = host_decoder.step(ids_h, last, positions, "dense")
        last = logits.argmax(-1).tolist()
        host_tokens.append(last)
        device_decoder.step(ids_d, [5, 9] if device_decoder.greedy is None else device_decoder.greedy, positions,
                            "dense")
        device_tokens.append(device_decoder.greedy)  # read back only at the end, as a pipelined loop does
        positions = [p + 1 for p in positions]
    assert [t.tolist() for t in device_tokens] == host_tokens
    assert device_decoder.captures == 2


def test_steps_a_graph_cannot_replay_say_why():
    from kvcache.engine.graph_decode import replayable

    assert replayable("sparq", {"r": 8, "k": 32}) is None
    assert "not replayed" in replayable("oracle", {})
    assert "byte budget" in replayable("sparq", {"bytes": 0.125})
    assert "min_coverage" in replayable("quest", {"top_pages": 4, "min_coverage": 0.9})
