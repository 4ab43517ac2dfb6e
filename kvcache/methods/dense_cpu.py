"""Dense decode attention for CPU stores: the fast path `attend` takes on the CPU (backend "auto").

The reference (kvcache.methods.dense) gathers a sequence's rows through advanced indexing, permutes
them and widens them to float32 before two einsums: three full copies of K and of V per call. Here
each of K and V is gathered into [Hkv, S, d] in the store's dtype (a page copy and a transpose) and
handed to ATen's CPU flash attention, which accumulates in float32 and returns the log-sum-exp.
`kvcache bench dense-cpu` (bench/results/dense_cpu_vm.json, the two paths timed in turn on the 2-core
VM): 1.2-2.5x the reference's speed in float16, where the reference widens K and V to float32, and
0.7-2.2x in float32, where both copy K and V twice.
"""

from __future__ import annotations

import math

import torch

from kvcache.methods.result import AttentionResult
from kvcache.methods.traffic import dense_bytes
from kvcache.store.page_table import PageTableCSR

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def sequence_rows(pool: torch.Tensor, csr: PageTableCSR, b: int) -> torch.Tensor:
    """Rows of sequence b from a sequence-major pool [N, Hkv, P, d] -> [Hkv, S, d] (a strided view of one copy)."""
    # index_select on dim 0 copies whole pages (one run of Hkv*P*d each); the transpose is a second,
    # cache-friendly pass. Indexing straight into the transposed order was 4x slower.
    rows = torch.index_select(pool, 0, csr.pages_of(b)).transpose(0, 1)
    return rows.reshape(pool.shape[1], -1, pool.shape[3])[:, : csr.host_lens[b]]


def dense_cpu(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] (CPU) over every cached position: out [B, Hq, d] in q's dtype, lse [B, Hq]."""
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32)
    for b in range(B):
        k, v = sequence_rows(k_seq, csr, b), sequence_rows(v_seq, csr, b)
        # A GQA group's G query heads go in as G query positions of its kv head, without a causal mask.
        o, s = _FLASH_CPU(q[b].view(1, Hkv, Hq // Hkv, d), k[None], v[None], 0.0, False, scale=scale)
        out[b], lse[b] = o.reshape(Hq, d), s.reshape(Hq)
    return AttentionResult(out, lse, dense_bytes(csr.host_lens, Hkv, d, k_seq.element_size()))
