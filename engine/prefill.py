"""Chunked prefill: run a prompt through the model chunk by chunk and append each chunk's K/V to the store.

The engine holds the prompt's post-RoPE K/V itself while prefilling, so each chunk attends
exactly (causally) to everything before it without reading the store back; the store gets one
append per chunk, all layers at once (one round trip over gRPC). The attention is a parameter so
a sparse prefill (MInference, engine/minference_prefill.py) can replace `causal_attention`; one
that needs its layer and chunk says so (see PrefillChunk).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcache.clients.inprocess import KVCacheClient
from kvcache.engine.model import Llama

# (q [T, Hq, d] for the last T of S positions, k [S, Hkv, d], v [S, Hkv, d]) -> out [T, Hq, d]
PrefillAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (positions done, positions in all) after each chunk
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PrefillChunk:
    """Where a chunk-aware prefill attention is called: attention(q, k, v, chunk) instead of attention(q, k, v).

    An attention object says it wants this with `chunk_aware = True` (MInference: each layer's heads
    have their own patterns). With `appends_kv = True` as well, it writes each layer's chunk K/V to
    the store itself (a served index or attention needs them there first), and prefill does not.
    """

    layer: int
    start: int  # the chunk's first position
    seq_id: str
    client: KVCacheClient
    token_ids: Sequence[int]  # the chunk's tokens


class CountedPrefill:
    """Base of a chunk-aware sparse prefill attention: what it computed, `pairs` of (query, key) against
    `causal_pairs` of dense causal prefill, over `calls` calls that took `seconds`."""

    chunk_aware = True

    def __init__(self) -> None:
        self.pairs = self.causal_pairs = self.calls = 0
        self.seconds = 0.0

    @property
    def density(self) -> float:
        """Query-key pairs computed over those of dense causal prefill, over every call so far."""
        return self.pairs / max(self.causal_pairs, 1)

    def count(self, pairs: tuple[int, int], started: float) -> None:
        """Add one call's (pairs computed, causal pairs), begun at time.perf_counter() `started`."""
        self.pairs += pairs[0]
        self.causal_pairs += pairs[1]
        self.calls += 1
        self.seconds += time.perf_counter() - started


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention of the last T positions q [T, Hq, d] over k, v [S, Hkv, d]; query i sees keys <= S-T+i."""
    T, Hq, d = q.shape
    S, Hkv, _ = k.shape
    G = Hq // Hkv
    # Query head h reads kv head h // G (Hugging Face's repeat_kv order, and the store's).
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    # SDPA's fused CUDA kernels take only 4-D inputs and no materialised mask: 3-D inputs with a
    # boolean [T, S] mask ran a 32K prefill on the math path. Imported here because the module
    # pulls in torch._dynamo (a second of start-up).
    from torch.nn.attention.bias import causal_lower_right

    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=causal_lower_right(T, S), scale=1.0 / math.sqrt(d))
    return out[0].transpose(0, 1)


class PromptKV:
    """Post-RoPE K/V of one prompt for every layer, preallocated [L, S, Hkv, d] and filled chunk by chunk."""

    def __init__(self, num_layers: int, length: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.k = torch.empty((num_layers, length, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, Hkv, d] at positions [start, start + T) of `layer`."""
        self.k[layer, start : start + k.shape[0]] = k
        self.v[layer, start : start + v.shape[0]] = v


def prefill(
    model: Llama,
    client: KVCacheClient,
    seq_id: str,
    token_ids: Sequence[int],
    cached_tokens: int = 0,
    chunk_size: int = 256,
    attention: PrefillAttention = causal_attention,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run `token_ids` (the whole prompt) through the model and append their K/V to `seq_id`;
    returns the float32 logits [vocab] after the last token.

    The first `cached_tokens` positions are already in the store (a reused prefix): their K/V are
    read back with one fetch per layer instead of being recomputed.
    """
    c = model.config
    store_dtype = client.config.dtype
    token_ids = [int(t) for t in token_ids]
    n = len(token_ids)
    if not 0 <= cached_tokens < n:
        raise ValueError(f"cached_tokens={cached_tokens} must be in [0, {n}): at least one token is computed")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    kv = PromptKV(c.num_layers, n, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    if cached_tokens:
        rows = torch.arange(cached_tokens).expand(c.num_kv_heads, cached_tokens)
        for layer in range(c.num_layers):
            keys, values = client.fetch(seq_id, layer, "rows", rows).tensors  # [Hkv, S, d]
            kv.write(layer, 0, keys.transpose(0, 1).to(model.device, model.dtype),
                     values.transpose(0, 1).to(model.device, model.dtype))
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
    chunk_aware = getattr(attention, "chunk_aware", False)
    appends_kv = chunk_aware and getattr(attention, "appends_kv", False)
    logits = None
    for start in range(cached_tokens, n, chunk_size):
        end = min(start + chunk_size, n)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start=start, end=end):
            kv.write(layer, start, k[0], v[0])
            if chunk_aware:
                chunk = PrefillChunk(layer, start, seq_id, client, token_ids[start:end])
                return attention(q[0], kv.k[layer, :end], kv.v[layer, :end], chunk)[None]
            return attention(q[0], kv.k[layer, :end], kv.v[layer, :end])[None]

        logits = model(ids[None, start:end], torch.arange(start, end, device=model.device)[None], attend,
                       last_only=True)
        if not appends_kv:
            client.append(seq_id, kv.k[:, start:end].to(store_dtype), kv.v[:, start:end].to(store_dtype),
                          token_ids=token_ids[start:end])
        if progress is not None:
            progress(end, n)
    return logits[0, -1]
