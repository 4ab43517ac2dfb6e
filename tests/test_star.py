"""Star Attention (docs/sparse-attention.md §4): anchored block encoding (phase 1), in this process and by
torchrun ranks writing to their own servers, and the query and decoding over shards (phase 2)."""

from __future__ import annotations

import math

import pytest
import torch
from service_support import (
    STORE,
    in_process_shards,
    one_torch_thread,  # noqa: F401 (an autouse fixture: importing it applies it here)
    start_servers,
    stop_servers,
    store_config,
)

from kvcache import InProcessClient
from kvcache.clients.sharded import ShardedClient
from kvcache.engine.config import ModelConfig
from kvcache.engine.generate import generate
from kvcache.engine.model import random_model
from kvcache.engine.prefill import prefill
from kvcache.engine.star import (
    StarPlan,
    encode_blocks,
    encode_context_local,
    encode_context_torchrun,
    prefill_query,
    save_model,
    split_prompt,
    star_generate,
)

CONFIG = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=STORE["num_layers"],
                     num_heads=4, num_kv_heads=STORE["num_kv_heads"], head_dim=STORE["head_dim"], rope_theta=1000.0,
                     max_position_embeddings=256)
CONTEXT = [int(t) for t in torch.randint(0, 101, (37,), generator=torch.Generator().manual_seed(0))]
QUERY = [5, 61, 17, 88, 2, 40, 33]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=5)


# ---- the transcription of §4 -----------------------------------------------------------------


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v over one sequence: q [T, Hq, d], k, v [T, Hkv, d]."""
    T, Hq, d = q.shape
    group = Hq // k.shape[1]
    out = torch.empty_like(q)
    for h in range(Hq):
        scores = q[:, h] @ k[:, h // group].T / math.sqrt(d)  # [T, T]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, h // group]
    return out


def star_transcription(model, context: list[int], b: int, a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§4 phase 1, as written: host 1 encodes c_1 alone; host i encodes [anchor ; c_i] (anchor = the first a
    tokens) with causal attention and c_i's original positions, then drops the anchor's K/V.
    Returns the K/V of the whole context [L, n, Hkv, d], block after block."""
    keys, values = [], []
    for start in range(0, len(context), b):
        block = context[start : start + b]
        anchor = context[:a] if start > 0 else []
        ids = torch.tensor([anchor + block])
        positions = torch.tensor([list(range(len(anchor))) + list(range(start, start + len(block)))])
        seen = {}

        def attend(layer, q, k, v, seen=seen):
            seen[layer] = (k[0], v[0])
            return plain_attention(q[0], k[0], v[0])[None]

        model(ids, positions, attend)
        keys.append(torch.stack([seen[layer][0][len(anchor) :] for layer in range(CONFIG.num_layers)]))
        values.append(torch.stack([seen[layer][1][len(anchor) :] for layer in range(CONFIG.num_layers)]))
    return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def stored(client: ShardedClient, seq: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the shards hold, [L, n, Hkv, d], read back in position order."""
    rows = torch.arange(n).expand(CONFIG.num_kv_heads, n)
    ks, vs = zip(*(client.fetch(seq, layer, "rows", rows).tensors for layer in range(CONFIG.num_layers)))
    return torch.stack(ks).transpose(1, 2), torch.stack(vs).transpose(1, 2)


# ---- plan ------------------------------------------------------------------------------------


def test_blocks_are_dealt_to_shards_in_contiguous_runs():
    plan = StarPlan.make(37, 4, block_size=8, anchor_size=3)
    assert plan.blocks() == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert plan.shard_blocks() == [[(0, 8), (8, 16)], [(16, 24)], [(24, 32)], [(32, 37)]]
    assert plan.shard_lengths() == [16, 8, 8, 5]
    default = StarPlan.make(37, 4)
    assert (default.block_size, default.anchor_size, default.shard_lengths()) == (10, 10, [10, 10, 10, 7])
    with pytest.raises(ValueError, match="anchor_size"):
        StarPlan.make(37, 2, block_size=8, anchor_size=9)


# ---- phase 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("block", "anchor", "chunk"), [(10, 10, 3), (10, 4, 4), (8, 0, 5), (37, 37, 7)])
def test_anchored_block_encoding_equals_the_transcription_of_section_4(model, block, anchor, chunk):
    want_k, want_v = star_transcription(model, CONTEXT, block, anchor)
    plan = StarPlan.make(len(CONTEXT), 3, block, anchor)
    got = list(encode_blocks(model, CONTEXT, plan.blocks(), anchor, chunk_size=chunk))
    assert [start for start, _, _ in got] == [s for s, _ in plan.blocks()]
    torch.testing.assert_close(torch.cat([k for _, k, _ in got], dim=1), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([v for _, _, v in got], dim=1), want_v, rtol=1e-5, atol=1e-5)
    with in_process_shards(3) as client:  # the same K/V land on the shards, each its contiguous run of blocks
        seq = client.create().seq_id
        encode_context_local(model, client, seq, CONTEXT, plan, chunk_size=chunk)
        assert client.shard_lengths(seq) == plan.shard_lengths()
        k, v = stored(client, seq, len(CONTEXT))
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)


def test_with_a_small_anchor_blocks_differ_from_causal_prefill(model):
    """The anchor matters: without the whole prefix, later blocks' K/V are not those of causal prefill."""
    causal_k, _ = star_transcription(model, CONTEXT, len(CONTEXT), len(CONTEXT))
    star_k, _ = star_transcription(model, CONTEXT, 10, 4)
    torch.testing.assert_close(star_k[:, :10], causal_k[:, :10])  # block 1 is encoded alone: causal
    assert float((star_k[:, 10:] - causal_k[:, 10:]).abs().max()) > 1e-2


# ---- phase 2 ---------------------------------------------------------------------------------


def test_the_query_prefill_over_stored_context_equals_causal_prefill(model):
    """Readers over the store plus local causal attention, lse-merged, give the logits of one causal pass."""
    whole = InProcessClient(store_config())
    seq = whole.create().seq_id
    want = prefill(model, whole, seq, CONTEXT + QUERY)
    with in_process_shards(3) as client:
        sharded = client.create().seq_id
        encode_context_local(model, client, sharded, CONTEXT, StarPlan.make(len(CONTEXT), 3, len(CONTEXT)))
        got = prefill_query(model, client, sharded, QUERY, len(CONTEXT), chunk_size=3, append_options={"shard": -1})
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert client.shard_lengths(sharded) == [len(CONTEXT), 0, len(QUERY)]
        assert client.describe(sharded).lengths == (len(CONTEXT) + len(QUERY),) * CONFIG.num_layers
        torch.testing.assert_close(stored(client, sharded, len(CONTEXT) + len(QUERY))[0],
                                   stored_one(whole, seq, len(CONTEXT) + len(QUERY)), rtol=1e-5, atol=1e-5)
        assert sum(len(s.store.sequence_ids()) for s in client.shards) == 3  # the readers were freed


def stored_one(client: InProcessClient, seq: str, n: int) -> torch.Tensor:
    rows = torch.arange(n).expand(CONFIG.num_kv_heads, n)
    return torch.stack([client.fetch(seq, layer, "rows", rows).tensors[0] for layer in range(CONFIG.num_layers)]
                       ).transpose(1, 2)


def test_star_with_one_block_generates_as_ordinary_decoding(model):
    want = generate(model, InProcessClient(store_config()), [CONTEXT + QUERY], max_new_tokens=8)
    with in_process_shards(1) as client:
        got = star_generate(model, client, CONTEXT, QUERY, max_new_tokens=8, launcher="local")
    assert got.tokens == want.tokens[0]
    assert got.decode_tokens == 7 and got.plan.blocks() == [(0, len(CONTEXT))]


def test_phase_2_over_four_shards_decodes_as_over_one(model):
    """The same anchored blocks, held by 1 or 4 shards: phase 2 merges exactly, so the tokens agree."""
    with in_process_shards(1) as one, in_process_shards(4) as four:
        a = star_generate(model, one, CONTEXT, QUERY, block_size=9, anchor_size=5, max_new_tokens=10, launcher="local")
        b = star_generate(model, four, CONTEXT, QUERY, block_size=9, anchor_size=5, max_new_tokens=10,
                          launcher="local")
    assert a.tokens == b.tokens
    assert b.plan.shard_lengths() == [18, 9, 9, 1]


# ---- phase 1 by torchrun ranks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def servers():
    procs = start_servers({name: ((), {}) for name in ("r0", "r1")})
    yield [procs["r0"], procs["r1"]]
    stop_servers(list(procs.values()))


def test_torchrun_ranks_write_the_anchored_blocks_to_their_own_servers(model, servers, tmp_path):
    plan = StarPlan.make(len(CONTEXT), 2, block_size=10, anchor_size=6)  # shard 0: 2 blocks, shard 1: 2 blocks
    want_k, want_v = star_transcription(model, CONTEXT, 10, 6)
    with ShardedClient([s.target for s in servers]) as client:
        seq = client.create().seq_id
        report = encode_context_torchrun(save_model(model, tmp_path / "model.pt"), client, seq, CONTEXT, plan,
                                         chunk_size=4)
        assert [r["positions"] for r in report.ranks] == plan.shard_lengths() == client.shard_lengths(seq)
        k, v = stored(client, seq, len(CONTEXT))
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)
        # Phase 2 over the servers gives the logits of phase 2 over in-process shards holding the same blocks.
        got = prefill_query(model, client, seq, QUERY, len(CONTEXT), append_options={"shard": -1})
        client.free(seq)
    with in_process_shards(2) as local:
        ref = local.create().seq_id
        encode_context_local(model, local, ref, CONTEXT, plan)
        want = prefill_query(model, local, ref, QUERY, len(CONTEXT), append_options={"shard": -1})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_failing_rank_reports_its_error_through_the_gather(tmp_path, monkeypatch):
    """One rank of gloo in this process: a plan for two shards is refused, and the error reaches the result file."""
    import json
    import socket

    from kvcache.engine import star_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    plan = {"endpoints": ["127.0.0.1:1", "127.0.0.1:2"], "result": str(tmp_path / "result.json")}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert star_worker.main([str(tmp_path / "plan.json")]) == 1
    (report,) = json.loads((tmp_path / "result.json").read_text())
    assert report["rank"] == 0 and "1 ranks for 2 shards" in report["error"]


class CharTokenizer:
    """One id per character; the chat template wraps the user's message in [ and ]>."""

    def prompt_ids(self, prompt, chat=False):
        text = f"[{prompt[0]['content']}]>" if chat else prompt
        return [ord(ch) for ch in text]


@pytest.mark.parametrize("chat", [False, True])
def test_the_question_and_what_follows_it_are_the_query(chat):
    context, query = split_prompt(CharTokenizer(), "some context", "why?", chat)
    text = "".join(map(chr, context + query))
    assert "".join(map(chr, context)) == ("[" if chat else "") + "some context"
    assert "".join(map(chr, query)) == "\n\nwhy?" + ("]>" if chat else "")
    assert text.endswith("why?]>" if chat else "why?")


def test_without_a_question_the_last_tokens_are_the_query():
    context, query = split_prompt(CharTokenizer(), "abcdefghij", None, False, query_tokens=3)
    assert (context, query) == ([ord(c) for c in "abcdefg"], [ord(c) for c in "hij"])
