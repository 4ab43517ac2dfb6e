"""Dense attention over a sequence's pages: the exact baseline (torch reference)."""

from __future__ import annotations

import math

import torch

from kvcache.methods.gather import gather_sequence
from kvcache.methods.result import AttentionResult
from kvcache.methods.traffic import dense_bytes
from kvcache.store.page_table import PageTableCSR


def attend_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of grouped queries q [Hkv, G, d] over k, v [Hkv, S, d] -> out [Hkv, G, d] f32, lse [Hkv, G].

    `mask` [Hkv, S] (bool), if given, keeps only the rows where it is True.
    """
    logits = torch.einsum("hgd,hsd->hgs", q.float(), k.float()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    return torch.einsum("hgs,hsd->hgd", probs, v.float()), lse


def dense(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over every cached position; reads 2*S*d elements per kv head."""
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b in range(B):
        k = gather_sequence(k_seq, csr, b)
        v = gather_sequence(v_seq, csr, b)
        o, s = attend_rows(q[b].view(Hkv, Hq // Hkv, d), k, v, scale)
        out[b], lse[b] = o.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return AttentionResult(out, lse, dense_bytes(csr.host_lens, Hkv, d, k_seq.element_size()))
