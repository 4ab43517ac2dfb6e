"""Chunked prefill: run a prompt through the model chunk by chunk and append each chunk's K/V to the store.

The engine holds the prompt's post-RoPE K/V itself while prefilling, so each chunk attends
exactly (causally) to everything before it without reading the store back; the store gets one
append per chunk, all layers at once (one round trip over gRPC). The attention is a parameter so
a sparse prefill (MInference, engine/minference_prefill.py) can replace `causal_attention`; one
that needs its layer and chunk says so (see PrefillChunk).
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcache.clients.inprocess import KVCacheClient
from kvcache.engine.config import PREFILL_CHUNK
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
    gqa = {}
    if q.device.type == "cpu":
        # The CPU flash kernel reads kv head h // G for query head h itself; copying K/V G times per chunk
        # cost a third of an 8K prefill's attention time.
        gqa = {"enable_gqa": G > 1}
    else:
        # Query head h reads kv head h // G (Hugging Face's repeat_kv order, and the store's).
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    # SDPA's fused CUDA kernels take only 4-D inputs and no materialised mask: 3-D inputs with a
    # boolean [T, S] mask ran a 32K prefill on the math path. Imported here because the module
    # pulls in torch._dynamo (a second of start-up).
    from torch.nn.attention.bias import causal_lower_right

    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=causal_lower_right(T, S), scale=1.0 / math.sqrt(d), **gqa)
    return out[0].transpose(0, 1)


@functools.cache
def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX): there a bfloat16 prefill is several times
    faster than a float32 one (docs/engine.md, "Prefill on the CPU")."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


@dataclass(frozen=True)
class PrefillDtypes:
    """What a prefill computes in: the weights (projections, MLPs) and the attention over the prompt."""

    weights: torch.dtype
    attention: torch.dtype


def prefill_dtypes(model: Llama, requested: str = "auto") -> PrefillDtypes:
    """The dtypes of a prefill: "float32", "bfloat16" or "float16" for both, or for "auto" the model's for the weights
    and, for a float32 model on a CPU with AMX, bfloat16 for the attention (docs/engine.md, "Prefill on the CPU")."""
    if requested != "auto":
        dtype = getattr(torch, requested)
        return PrefillDtypes(dtype, dtype)
    fast = model.device.type == "cpu" and model.dtype == torch.float32 and cpu_has_fast_bfloat16()
    return PrefillDtypes(model.dtype, torch.bfloat16 if fast else model.dtype)


_CAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_in(model: Llama, dtype: torch.dtype) -> Llama:
    """`model` with its weights in `dtype`: itself, or a copy made once and kept while the model lives."""
    if dtype == model.dtype:
        return model
    copies = _CAST.setdefault(model, {})
    if dtype not in copies:
        copy = Llama(model.config).to(model.device)
        copy.load_state_dict(model.state_dict())
        copies[dtype] = copy.to(dtype).eval()
    return copies[dtype]


class PromptKV:
    """Post-RoPE K/V of one prompt for every layer, preallocated [L, S, Hkv, d] and filled chunk by chunk; with
    `attention_dtype`, also a copy in that dtype (`for_attention`) that the prefill's attention reads."""

    def __init__(self, num_layers: int, length: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", attention_dtype: torch.dtype | None = None) -> None:
        self.k = torch.empty((num_layers, length, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        if attention_dtype in (None, dtype):
            self.k_attn, self.v_attn = self.k, self.v
        else:
            self.k_attn = torch.empty_like(self.k, dtype=attention_dtype)
            self.v_attn = torch.empty_like(self.k_attn)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, Hkv, d] at positions [start, start + T) of `layer`."""
        self.k[layer, start : start + k.shape[0]] = k
        self.v[layer, start : start + v.shape[0]] = v
        if self.k_attn is not self.k:
            self.k_attn[layer, start : start + k.shape[0]] = k
            self.v_attn[layer, start : start + v.shape[0]] = v

    def for_attention(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [end, Hkv, d] of `layer`'s first `end` positions in the attention's dtype."""
        return self.k_attn[layer, :end], self.v_attn[layer, :end]


def prefill(
    model: Llama,
    client: KVCacheClient,
    seq_id: str,
    token_ids: Sequence[int],
    cached_tokens: int = 0,
    chunk_size: int = PREFILL_CHUNK,
    attention: PrefillAttention = causal_attention,
    progress: Progress | None = None,
    dtypes: PrefillDtypes | None = None,
) -> torch.Tensor:
    """Run `token_ids` (the whole prompt) through the model and append their K/V to `seq_id`;
    returns the float32 logits [vocab] after the last token.

    The first `cached_tokens` positions are already in the store (a reused prefix): their K/V are
    read back with one fetch per layer instead of being recomputed. The prefill computes in `dtypes`
    (default: the model's), with a copy of the weights where their dtype differs; the logits come from the model's
    own final norm and head.
    """
    dtypes = dtypes or PrefillDtypes(model.dtype, model.dtype)
    runner = model_in(model, dtypes.weights)
    c = model.config
    store_dtype = client.config.dtype
    token_ids = [int(t) for t in token_ids]
    n = len(token_ids)
    if not 0 <= cached_tokens < n:
        raise ValueError(f"cached_tokens={cached_tokens} must be in [0, {n}): at least one token is computed")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    kv = PromptKV(c.num_layers, n, c.num_kv_heads, c.head_dim, runner.dtype, model.device, dtypes.attention)
    if cached_tokens:
        rows = torch.arange(cached_tokens).expand(c.num_kv_heads, cached_tokens)
        for layer in range(c.num_layers):
            keys, values = client.fetch(seq_id, layer, "rows", rows).tensors  # [Hkv, S, d]
            kv.write(layer, 0, keys.transpose(0, 1).to(model.device, runner.dtype),
                     values.transpose(0, 1).to(model.device, runner.dtype))
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
    chunk_aware = getattr(attention, "chunk_aware", False)
    appends_kv = chunk_aware and getattr(attention, "appends_kv", False)
    hidden = None
    for start in range(cached_tokens, n, chunk_size):
        end = min(start + chunk_size, n)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start=start, end=end):
            kv.write(layer, start, k[0], v[0])
            keys, values = kv.for_attention(layer, end)
            qa = q[0].to(keys.dtype)
            if chunk_aware:
                chunk = PrefillChunk(layer, start, seq_id, client, token_ids[start:end])
                return attention(qa, keys, values, chunk)[None].to(q.dtype)
            return attention(qa, keys, values)[None].to(q.dtype)

        hidden = runner.hidden_states(ids[None, start:end], torch.arange(start, end, device=model.device)[None],
                                      attend)
        if not appends_kv:
            client.append(seq_id, kv.k[:, start:end].to(store_dtype), kv.v[:, start:end].to(store_dtype),
                          token_ids=token_ids[start:end])
        if progress is not None:
            progress(end, n)
    # The logits by the model's own weights: rounded to bfloat16 they tie where float32 tells tokens apart.
    return model.logits(hidden[:, -1:])[0, -1]
