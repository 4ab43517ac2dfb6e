"""Star Attention in the accuracy harness (`kvcache eval --star`; docs/sparse-attention.md §4).

A prompt is encoded as Star Attention encodes it, instead of by one causal prefill. Phase 1: all
but the prompt's last `query_tokens` tokens are the context, split into blocks of b tokens, each
block after the anchor (the context's first a tokens) with its original positions, the anchor's
K/V dropped, the blocks dealt to the shards (engine/star.py: encode_context_local). Phase 2: the
last tokens (the query: a passkey prompt's question, or the last token of a text) attend to every
shard through lse-merged attention (prefill_query), and so does every token decoded or scored
after them (each decode step's attend fans out to the shards; new K/V go to the last shard).

The harness then scores the sequence exactly as it scores a dense prefill: teacher-forced
perplexity and top-1 agreement, free-running greedy agreement and passkey retrieval, against dense
prefill and dense decoding. The shards are in-process stores, one per shard, or real `kvcache serve`
processes (`--star-servers`); phase 2 over either gives the same merge (tests/test_sharded.py).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from kvcache.clients.sharded import ShardedClient
from kvcache.engine.model import Llama
from kvcache.engine.star import StarPlan, encode_context_local, prefill_query


@dataclass(frozen=True)
class StarSetting:
    """One Star Attention configuration: `shards` shards, blocks of `block` tokens (None: one block per shard,
    b = ceil(context / shards)), and an anchor of `anchor` (a fraction in [0, 1]) of the block."""

    shards: int
    block: int | None
    anchor: Fraction

    def plan(self, context_len: int) -> StarPlan:
        """The plan for a context of `context_len` tokens; the anchor is floor(anchor * b) tokens."""
        b = min(self.block or -(-context_len // self.shards), context_len)
        return StarPlan.make(context_len, self.shards, b, math.floor(self.anchor * b))

    @property
    def label(self) -> str:
        """The row name, e.g. "star N=4 b=C/4 a=b/4"."""
        block = f"C/{self.shards}" if self.block is None else str(self.block)
        p, q = self.anchor.numerator, self.anchor.denominator
        anchor = "0" if p == 0 else ("b" if p == 1 else f"{p}b") + ("" if q == 1 else f"/{q}")
        return f"star N={self.shards} b={block} a={anchor}"


def parse_settings(shards: str, blocks: str = "auto", anchors: str = "1") -> list[StarSetting]:
    """Every (shards, block, anchor) of comma-separated lists: shard counts; block sizes in tokens or "auto"
    (one block per shard); anchors as fractions of the block ("1", "1/4", "0")."""
    counts = [int(n) for n in shards.split(",") if n.strip()]
    sizes = [None if b.strip() == "auto" else int(b) for b in blocks.split(",") if b.strip()]
    fractions = [Fraction(a.strip()) for a in anchors.split(",") if a.strip()]
    if not counts or not sizes or not fractions:
        raise ValueError(f"--shards {shards!r}, --star-blocks {blocks!r} and --star-anchors {anchors!r} must each "
                         f"name at least one value")
    if any(n < 1 for n in counts) or any(b < 1 for b in sizes if b is not None):
        raise ValueError(f"shard counts ({shards}) and block sizes ({blocks}) must be positive")
    if any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"anchors ({anchors}) are fractions of the block, in [0, 1]")
    return [StarSetting(n, b, f) for n in counts for b in sizes for f in fractions]


@dataclass(frozen=True)
class StarEncoder:
    """An `Encoder` of the harness (engine/evaluation.py): phase 1 for all but the prompt's last `query_tokens`
    tokens, phase 2 for those; the client must be a ShardedClient with `setting.shards` shards."""

    setting: StarSetting
    query_tokens: int = 1
    chunk_size: int = 512

    def split(self, prompt_len: int) -> int:
        """Tokens of a `prompt_len`-token prompt that phase 1 encodes (the context); the rest is the query."""
        if prompt_len < 2:
            raise ValueError(f"a Star Attention prompt needs a context and a query; got {prompt_len} token(s)")
        return prompt_len - max(1, min(self.query_tokens, prompt_len - 1))

    def plan(self, prompt_len: int) -> StarPlan:
        """The phase-1 plan of a `prompt_len`-token prompt."""
        return self.setting.plan(self.split(prompt_len))

    def __call__(self, model: Llama, client: ShardedClient, prompt: Sequence[int]) -> tuple[str, torch.Tensor]:
        """A new sharded sequence holding `prompt` (phase 1, then phase 2 for the query); the logits after it."""
        if client.num_shards != self.setting.shards:
            raise ValueError(f"{self.setting.label} needs {self.setting.shards} shards; the client has "
                             f"{client.num_shards}")
        n = self.split(len(prompt))
        context, query = [int(t) for t in prompt[:n]], [int(t) for t in prompt[n:]]
        plan = self.setting.plan(n)
        seq = client.create().seq_id
        try:
            encode_context_local(model, client, seq, context, plan, self.chunk_size)
            # The query's K/V go to the query host (the last shard), as the tokens decoded after it do.
            logits = prefill_query(model, client, seq, query, n, append_options={"shard": -1})
        except BaseException:
            client.free(seq)
            raise
        return seq, logits

    def row(self, prompt_len: int) -> dict:
        """The JSON fields of a harness row that used this encoder on a `prompt_len`-token prompt."""
        plan = self.plan(prompt_len)
        return {"shards": plan.num_shards, "block_size": plan.block_size, "anchor_size": plan.anchor_size,
                "anchor_fraction": str(self.setting.anchor), "star_context_tokens": plan.context_len,
                "star_query_tokens": prompt_len - plan.context_len}


def shard_clients(counts: Sequence[int], config, positions: int, page_size: int,
                  servers: str | None = None) -> dict[int, ShardedClient]:
    """A ShardedClient per shard count: over in-process float32 stores with room for `positions` positions each,
    or over the first N of `servers` ("host:port,...", checked against the model's shape)."""
    from kvcache import InProcessClient, KVCacheConfig
    from kvcache.engine.star import connect

    targets = [t.strip() for t in (servers or "").split(",") if t.strip()]
    if targets and max(counts) > len(targets):
        raise ValueError(f"--shards {max(counts)} needs as many servers; --star-servers names {len(targets)}")
    clients = {}
    for n in sorted(set(counts)):
        if targets:
            clients[n] = connect(argparse.Namespace(servers=",".join(targets[:n]), token_file=None, block_size=None),
                                 config)
        else:
            store = KVCacheConfig(config.num_layers, config.num_kv_heads, config.head_dim, page_size=page_size,
                                  dtype="float32", device="cpu", device_pages=-(-positions // page_size) + 1)
            clients[n] = ShardedClient([InProcessClient(store) for _ in range(n)])
    return clients
