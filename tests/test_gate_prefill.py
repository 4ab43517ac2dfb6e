"""The gate in prefill (docs/sparse-attention.md §3): the key blocks each query block reads, against a plain
transcription
(one query block at a time through the decode gate's own scoring and choice); with a budget that covers every block it
is dense causal prefill; the block-sparse kernel runs on its index; the engine and `kvcache generate` use it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from kernel_support import INTERPRETED, NO_BF16_ON_CPU
from service_support import store_config
from test_engine_minference import CONFIG, PROMPT, assert_same, run
from test_engine_model import one_torch_thread  # noqa: F401 (an autouse fixture)
from test_gate import _model_unrotate

from kvcache import InProcessClient
from kvcache.engine.gate_prefill import GatePrefill, check_gate_for_model
from kvcache.engine.model import random_model
from kvcache.engine.prefill import causal_attention
from kvcache.errors import GateFileInvalid, InvalidParameter, ShapeMismatch
from kvcache.methods.gate_model import GateShape, PageGate, gate_logits, gate_select
from kvcache.prefill.gate_prefill import gate_block_index, gate_block_logits
from kvcache.prefill.minference_index import causal_index
from kvcache.prefill.serving import index_pairs, paged, sparse_attention
from kvcache.store.page_pool import SUMMARY_MAX, SUMMARY_MEAN, SUMMARY_MIN


def random_gate(num_layers: int, hkv: int, group: int, d: int, page: int, dg: int = 32, seed: int = 0,
                model_rope_base: float = 0.0) -> PageGate:
    gate = PageGate(GateShape(num_layers, hkv, group, d, page, dg, model_rope_base=model_rope_base), seed=seed)
    with torch.no_grad():
        gate.q_bias.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return gate


def transcribed_blocks(q, k, start, layer_gate, budget, threshold) -> tuple[dict[tuple[int, int], set[int]], list]:
    """({(kv head, absolute query block): chosen key blocks}, [logits [Hkv, M+1] of each query block]), one query
    block at a time: its queries averaged per head, its key blocks' min/max/mean as page summaries, then the decode
    gate's gate_logits and gate_select."""
    P = layer_gate.shape.page_size
    T, Hq, d = q.shape
    S, Hkv = start + T, k.shape[1]
    if layer_gate.shape.pre_rope:  # q and k rotated back by the engine's own RoPE, then the gate on rotated vectors
        base = layer_gate.shape.model_rope_base
        q, k = _model_unrotate(q, torch.arange(start, S), base), _model_unrotate(k, torch.arange(S), base)
        layer_gate = replace(layer_gate, shape=replace(layer_gate.shape, model_rope_base=0.0))
    out, logits = {}, []
    for M in range(start // P, (S - 1) // P + 1):
        lo, hi = max(M * P, start), min((M + 1) * P, S)
        q_bar = q[lo - start : hi - start].float().mean(0).view(Hkv, Hq // Hkv, d)
        summary = torch.empty((M + 1, Hkv, 3, d))
        for j in range(M + 1):
            rows = k[j * P : min((j + 1) * P, S)].float()  # [<=P, Hkv, d]
            summary[j, :, SUMMARY_MAX], summary[j, :, SUMMARY_MIN] = rows.amax(0), rows.amin(0)
            summary[j, :, SUMMARY_MEAN] = rows.mean(0)
        logits.append(gate_logits(layer_gate, q_bar, summary))
        chosen, count = gate_select(torch.softmax(logits[-1], -1), P, budget, threshold)
        for h in range(Hkv):
            out[(h, M)] = set(chosen[h, : count[h]].tolist())
    return out, logits


def index_blocks(index, group: int) -> dict[tuple[int, int], set[int]]:
    out = {}
    for hq in range(index.num_heads):
        for m in range(index.num_query_blocks):
            listed = index.block_index[hq, m, : index.block_count[hq, m]].tolist()
            assert listed == sorted(listed) and -1 not in listed
            assert listed[-1] == index.first_block + m  # the diagonal block, last, as the kernel needs
            if hq % group:
                assert set(listed) == out[(hq // group, index.first_block + m)]  # a group shares its blocks
            else:
                out[(hq // group, index.first_block + m)] = set(listed)
    return out


# (q heads, kv heads, head dim, page, chunk start, chunk length): GQA and not, chunks starting mid-page and on a
# page boundary, a partial last page, a one-token chunk.
SHAPES = [(4, 2, 16, 16, 37, 113), (6, 2, 32, 16, 0, 50), (3, 3, 16, 32, 96, 70), (8, 2, 16, 16, 16, 1),
          (4, 1, 16, 16, 160, 33)]


@pytest.mark.parametrize("model_rope_base", [0.0, 300.0], ids=["rotated", "pre_rope"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("limits", [(48, None), (80, None), (None, 0.05), (64, 0.02), (10**6, None)])
def test_blocks_match_the_transcription(shape, limits, model_rope_base):
    Hq, Hkv, d, P, start, T = shape
    gen = torch.Generator().manual_seed(sum(shape))
    k = torch.randn((start + T, Hkv, d), generator=gen)
    q = torch.randn((T, Hq, d), generator=gen)
    layer_gate = random_gate(2, Hkv, Hq // Hkv, d, P, seed=T, model_rope_base=model_rope_base).layer(1)
    k_seq, _, csr = paged(k, k, P)
    index = gate_block_index(q, k_seq, csr, start, layer_gate, budget=limits[0], threshold=limits[1])
    assert index.block_size == P and index.start == start and index.num_queries == T
    blocks, logits = transcribed_blocks(q, k, start, layer_gate, *limits)
    assert index_blocks(index, Hq // Hkv) == blocks
    got = gate_block_logits(q, k.transpose(0, 1), start, layer_gate)  # [Hkv, nq, nkb]
    for m, want in enumerate(logits):
        torch.testing.assert_close(got[:, m, : want.shape[1]], want, rtol=1e-4, atol=1e-4)


def chunk(start: int, T: int, seed: int, Hq: int = 4, Hkv: int = 2, d: int = 16, P: int = 16):
    """A chunk's q [T, Hq, d] at `start`, the keys and values so far [start + T, Hkv, d], and them as pages."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn((2, start + T, Hkv, d), generator=gen)
    q = torch.randn((T, Hq, d), generator=gen)
    return q, k, v, *paged(k, v, P)


def test_a_budget_covering_every_block_is_dense_causal_prefill():
    start, T, P = 37, 113, 16
    q, k, v, k_seq, v_seq, csr = chunk(start, T, seed=3)
    index = gate_block_index(q, k_seq, csr, start, random_gate(1, 2, 2, 16, P).layer(0), budget=start + T)
    want = causal_index(q, start, block_size=P)
    assert torch.equal(index.block_index, want.block_index) and torch.equal(index.block_count, want.block_count)
    out, _ = sparse_attention(q, k_seq, v_seq, csr, index, backend="torch")
    torch.testing.assert_close(out, causal_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_small_budget_reads_its_blocks_and_the_kernel_attends_to_exactly_them():
    Hq, d, P, start, T = 4, 16, 16, 40, 120
    q, k, v, k_seq, v_seq, csr = chunk(start, T, seed=4)
    index = gate_block_index(q, k_seq, csr, start, random_gate(1, 2, 2, d, P).layer(0), budget=3 * P)
    M = torch.arange(index.num_query_blocks) + index.first_block
    assert torch.equal(index.block_count, torch.clamp(M + 1, max=3).expand(Hq, -1).to(torch.int32))
    pairs, causal = index_pairs(index)
    assert pairs < causal
    want, want_lse = sparse_attention(q, k_seq, v_seq, csr, index, backend="torch")
    # The exact attention of each query over its blocks' keys, from the index's own mask.
    for h in range(Hq):
        mask = index.mask(h)
        logits = (q[:, h] @ k[:, h // 2].T) / d**0.5
        ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v[:, h // 2]
        torch.testing.assert_close(want[:, h], ref, rtol=1e-5, atol=1e-5)
    got, got_lse = sparse_attention(q, k_seq, v_seq, csr, index, backend="triton")  # the interpreter on the CPU
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused():
    q, k = torch.randn(20, 4, 16), torch.randn(20, 2, 16)
    k_seq, _, csr = paged(k, k, 16)
    layer_gate = random_gate(1, 2, 2, 16, 16).layer(0)
    with pytest.raises(InvalidParameter, match="budget, a threshold"):
        gate_block_index(q, k_seq, csr, 0, layer_gate)
    with pytest.raises(InvalidParameter, match="threshold"):
        gate_block_index(q, k_seq, csr, 0, layer_gate, threshold=1.5)
    with pytest.raises(ShapeMismatch):
        gate_block_index(q[0], k_seq, csr, 0, layer_gate, budget=32)
    with pytest.raises(InvalidParameter):
        GatePrefill(random_gate(1, 2, 2, 16, 16))


# ---- the engine -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=5)


def model_gate(page: int = 16) -> PageGate:
    return random_gate(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.num_heads // CONFIG.num_kv_heads,
                       CONFIG.head_dim, page)


def test_engine_prefill_with_every_block_is_dense_prefill(model):
    dense = run(model, InProcessClient(store_config()))
    attention = GatePrefill(model_gate(), budget=len(PROMPT))
    assert_same(run(model, InProcessClient(store_config()), attention), dense)
    assert attention.density == 1.0 and attention.calls == CONFIG.num_layers * 3  # 90 positions in chunks of 32


def test_engine_prefill_with_a_small_budget_computes_fewer_pairs(model):
    dense = run(model, InProcessClient(store_config()))
    attention = GatePrefill(model_gate(), budget=32)
    sparse = run(model, InProcessClient(store_config()), attention)
    assert 0.3 < attention.density < 0.9
    assert not torch.allclose(sparse[0], dense[0], atol=1e-3)


def test_a_gate_for_another_model_is_refused():
    with pytest.raises(GateFileInvalid, match="head_dim=32"):
        check_gate_for_model(random_gate(CONFIG.num_layers, 1, 4, 32, 16), CONFIG)
    fits = random_gate(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.num_heads // CONFIG.num_kv_heads,
                       CONFIG.head_dim, 16, model_rope_base=CONFIG.rope_theta)
    check_gate_for_model(fits, CONFIG)
    with pytest.raises(GateFileInvalid, match="model_rope_base"):  # rotates back with another model's RoPE
        check_gate_for_model(fits, replace(CONFIG, rope_theta=CONFIG.rope_theta * 2))


def test_generate_with_gate_prefill_and_gate_decode(tmp_path, capsys):
    """The real SmolLM2 and its shipped gate through `kvcache generate --prefill-method gate --method gate`."""
    from kvcache.cli import main

    prompt = "Here is a list of fruits: apple, banana, cherry, grape, lemon, mango, orange, pear. " * 4
    answers = {}
    for how in ("dense", "gate"):
        out = tmp_path / f"{how}.json"
        code = main(["generate", "--prompt", prompt + "The first fruit in the list is", "--max-new-tokens", "4",
                     "--prefill-method", how, "--prefill-budget", "64", "--method", how, "--budget", "64",
                     "--json", str(out)])
        assert code == 0, capsys.readouterr().err
        answers[how] = json.loads(out.read_text())
    gate = answers["gate"]
    assert gate["prefill"] == "gate" and gate["method"] == "gate" and gate["params"] == {"budget": 64}
    assert 0 < gate["prefill_density"] < 1  # ~90 tokens: 6 pages, 4 read per query block at most
    assert gate["attention_bytes_per_token"] < answers["dense"]["attention_bytes_per_token"]
    assert "(gate, " in capsys.readouterr().err


@pytest.mark.skipif(INTERPRETED, reason="bf16 needs compiled kernels: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_BF16_ON_CPU)
@pytest.mark.parametrize("budget", [48, 2048])
def test_bfloat16_gate_prefill_on_the_gpu(budget):
    """The gate's index on CUDA and the compiled block-sparse kernel in bf16, against the torch reference."""
    Hq, Hkv, d, P, start, T = 8, 2, 64, 16, 77, 190
    gen = torch.Generator().manual_seed(6)
    k, v = torch.randn((2, start + T, Hkv, d), generator=gen).cuda().to(torch.bfloat16)
    q = torch.randn((T, Hq, d), generator=gen).cuda().to(torch.bfloat16)
    k_seq, v_seq, csr = paged(k, v, P)
    layer_gate = random_gate(1, Hkv, Hq // Hkv, d, P).layer(0).to("cuda")
    index = gate_block_index(q, k_seq, csr, start, layer_gate, budget=budget)
    index_blocks(index, Hq // Hkv)  # ascending, the diagonal last, shared by a group
    out, lse = sparse_attention(q, k_seq, v_seq, csr, index, backend="triton")
    want, want_lse = sparse_attention(q, k_seq, v_seq, csr, index, backend="torch")
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=2e-2, atol=2e-2)
