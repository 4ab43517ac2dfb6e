"""MInference sparse prefill in the engine (docs/sparse-attention.md §2): each layer's heads attend by their searched
patterns.

    attention = MInferencePrefill(kvcache.engine.patterns.load("smollm2-135m"))
    prefill(model, client, seq_id, ids, attention=attention)     # or generate(..., prefill_attention=attention)

Per chunk and layer, the index of each head is built from the chunk's queries and the keys so far
(kvcache.prefill.serving.build_index), then attention is computed exactly on it: the listed pairs'
tiles on the CPU (kvcache.prefill.block_sparse_cpu), the Triton kernel on CUDA. Where the index and the
attention come from:

  served="none"       the engine builds the index from the prompt's K/V it holds and attends itself;
  served="index"      the KV store builds the index from the keys it holds (SparseIndex), the engine attends;
  served="attention"  the KV store computes the whole sparse attention of the chunk (SparsePrefill).

The served variants append each layer's chunk K/V to the store before asking about it (prefill then
does not append them again). Decoding is untouched: it stays whatever method the decode step uses.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from kvcache.engine.patterns import PatternConfig
from kvcache.engine.prefill import CountedPrefill, PrefillChunk
from kvcache.prefill.minference_index import BLOCK_SIZE
from kvcache.prefill.serving import build_index, index_pairs, paged, sparse_attention

SERVED = ("none", "index", "attention")


class MInferencePrefill(CountedPrefill):
    """A chunk-aware prefill attention (kvcache.engine.prefill.PrefillChunk): q [T, Hq, d], k/v [S, Hkv, d]
    -> out [T, Hq, d].

    Counts what it computed (kvcache.engine.prefill.CountedPrefill).
    """

    def __init__(self, patterns: PatternConfig, *, served: str = "none", backend: str = "auto",
                 block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        if served not in SERVED:
            raise ValueError(f"served={served!r}; expected one of {SERVED}")
        self.patterns = patterns
        self.served = served
        self.backend = backend
        self.block_size = block_size
        self.appends_kv = served != "none"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        t0 = time.perf_counter()
        T, S = q.shape[0], k.shape[0]
        start = S - T
        heads = self.patterns.layers[chunk.layer]
        if self.served == "none":
            out, pairs = self._local(q, k, v, start, heads)
        else:
            client = chunk.client
            dtype = client.config.dtype
            client.append(chunk.seq_id, k[start:].to(dtype), v[start:].to(dtype), layer=chunk.layer, start=start,
                          token_ids=chunk.token_ids)
            if self.served == "index":
                index = client.sparse_index(chunk.seq_id, chunk.layer, q.to(dtype), start, heads, self.block_size)
                out, pairs = self._local(q, k, v, start, heads, index)
            else:
                r = client.sparse_prefill(chunk.seq_id, chunk.layer, q.to(dtype), start, heads, self.block_size,
                                          self.backend)
                out, pairs = r.out.to(q.dtype), (r.pairs, r.causal_pairs)
        self.count(pairs, t0)
        return out

    def _local(self, q, k, v, start, heads, index=None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Attention over the engine's own K/V laid out as pages; the index built here unless given."""
        k_seq, v_seq, csr = paged(k, v, self.block_size)
        if index is None:
            index = build_index(q, k_seq, csr, start, heads, block_size=self.block_size)
        else:
            index = _on(index, q.device)
        out, _ = sparse_attention(q, k_seq, v_seq, csr, index, backend=self.backend)
        return out, index_pairs(index)


def _on(index, device):
    """A served index (CPU tensors) on the engine's device."""
    if index.block_index.device == device:
        return index
    return replace(index, block_index=index.block_index.to(device), block_count=index.block_count.to(device),
                   column_index=index.column_index.to(device), column_count=index.column_count.to(device))
