"""Accuracy of decode attention methods against dense on a real model: perplexity, greedy agreement, passkey.

Every method decodes from the same densely prefilled prefix (sparse methods act at decode time);
the methods run side by side as rows of one batched forward pass, each row's attention going to
its own sequence in the store with its own method, so their inputs are identical up to the first
token where they differ. An `Encoder` replaces the prefill when the prompt is encoded otherwise
(Star Attention's two phases, engine/star_eval.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcache.clients.inprocess import KVCacheClient
from kvcache.engine.decode import AttentionSpec
from kvcache.engine.model import Llama
from kvcache.engine.prefill import PrefillAttention, causal_attention, prefill

# (model, client, prompt) -> (a new sequence holding the prompt's K/V, float32 logits [vocab] after the prompt)
Encoder = Callable[[Llama, KVCacheClient, Sequence[int]], tuple[str, torch.Tensor]]


@dataclass
class ForcedRun:
    """Teacher-forced decoding of one token sequence by several methods."""

    nll: torch.Tensor  # [methods, steps] negative log-likelihood (nats) of each next token
    argmax: torch.Tensor  # [methods, steps] each method's greedy next token
    bytes_per_token: list[float]  # attention bytes read per decoded token (all layers), per method


def prefill_copies(model: Llama, client: KVCacheClient, prompt: Sequence[int], n: int,
                   chunk_size: int = 512, attention: PrefillAttention = causal_attention,
                   encode: Encoder | None = None) -> tuple[list[str], torch.Tensor]:
    """n sequences holding `prompt`: one prefill (by `attention`, or `encode` if given), then forks (shared pages);
    and the logits after the prompt."""
    if encode is None:
        first = client.create(token_ids=prompt)
        seq = first.seq_id
        logits = prefill(model, client, seq, prompt, first.cached_tokens, chunk_size, attention)
    else:
        seq, logits = encode(model, client, prompt)
    return [seq] + [client.fork(seq).seq_id for _ in range(n - 1)], logits


def step_methods(model: Llama, client: KVCacheClient, seq_ids: Sequence[str], specs: Sequence[AttentionSpec],
                 tokens: Sequence[int], position: int) -> tuple[torch.Tensor, list[int]]:
    """One decode step: row b feeds tokens[b] at `position` to seq_ids[b] with specs[b];
    logits [B, vocab], bytes [B]."""
    dtype = client.config.dtype
    nbytes = [0] * len(seq_ids)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for b, (seq, spec) in enumerate(zip(seq_ids, specs)):
            method, params = spec.at_layer(layer, *spec.for_length(position + 1, client.config))
            r = client.attend([seq], layer, q[b : b + 1, 0].to(dtype), method=method, params=params,
                              new_k=k[b : b + 1, 0].to(dtype), new_v=v[b : b + 1, 0].to(dtype))
            out[b, 0] = r.out[0].to(q.dtype)
            nbytes[b] += r.bytes_read
        return out

    ids = torch.tensor([[int(t)] for t in tokens], dtype=torch.long)
    pos = torch.full((len(seq_ids), 1), position, dtype=torch.long)
    return model(ids, pos, attend)[:, 0], nbytes


def teacher_force(model: Llama, client: KVCacheClient, prefix: Sequence[int], continuation: Sequence[int],
                  specs: Sequence[AttentionSpec], prefill_attention: PrefillAttention = causal_attention,
                  encode: Encoder | None = None) -> ForcedRun:
    """Feed continuation[:-1] after `prefix` to every method; score each method's prediction of continuation[1:]."""
    seq_ids, _ = prefill_copies(model, client, prefix, len(specs), attention=prefill_attention, encode=encode)
    try:
        nll, argmax = [], []
        total = [0] * len(specs)
        for i in range(len(continuation) - 1):
            logits, nbytes = step_methods(model, client, seq_ids, specs, [continuation[i]] * len(specs),
                                          len(prefix) + i)
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll.append(-logp[:, continuation[i + 1]])
            argmax.append(logits.argmax(dim=-1))
            total = [t + n for t, n in zip(total, nbytes)]
    finally:
        for s in seq_ids:
            client.free(s)
    steps = max(len(continuation) - 1, 1)
    return ForcedRun(torch.stack(nll, dim=1), torch.stack(argmax, dim=1), [t / steps for t in total])


def greedy_methods(model: Llama, client: KVCacheClient, prompt: Sequence[int], specs: Sequence[AttentionSpec],
                   max_new_tokens: int, prefill_attention: PrefillAttention = causal_attention,
                   encode: Encoder | None = None) -> list[list[int]]:
    """Greedy continuation of `prompt` by each method (free running, not forced)."""
    seq_ids, logits = prefill_copies(model, client, prompt, len(specs), attention=prefill_attention, encode=encode)
    first = int(logits.argmax())
    outs = [[first] for _ in specs]
    try:
        for i in range(max_new_tokens - 1):
            logits, _ = step_methods(model, client, seq_ids, specs, [o[-1] for o in outs], len(prompt) + i)
            for o, t in zip(outs, logits.argmax(dim=-1).tolist()):
                o.append(t)
    finally:
        for s in seq_ids:
            client.free(s)
    return outs


def perplexity(nll: torch.Tensor) -> list[float]:
    """exp(mean nll) per method row."""
    return [math.exp(float(row.mean())) for row in nll]
