"""MInference sparse prefill, torch reference (docs/sparse-attention.md §2): exact causal attention restricted to an
index.

The kernels in kernels/sparse_prefill.py are tested against this; with `causal_index` it is
dense causal attention of the chunk over everything cached before and inside it.
"""

from __future__ import annotations

import math

import torch

from kvcache.methods.gather import gather_sequence
from kvcache.prefill.minference_index import SparseIndex, chunk_keys
from kvcache.store.page_table import PageTableCSR


def minference_prefill(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    index: SparseIndex,
    *,
    b: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the chunk q [T, Hq, d] at index.start over sequence b's paged K/V, on index.mask only.

    Returns out [T, Hq, d] (q dtype) and lse [T, Hq] float32 (natural log). A query with no
    allowed key gets out 0 and lse -inf. One head at a time, so memory stays at a [T, S] mask.
    """
    index.check_chunk(q)
    T, Hq, d = q.shape
    S = index.num_keys
    keys = chunk_keys(k_seq, csr, index.start, q, b).float()  # [Hkv, S, d]
    values = gather_sequence(v_seq, csr, b)[:, :S].float()
    G = Hq // keys.shape[0]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    for h in range(Hq):
        logits = (q[:, h].float() @ keys[h // G].T) * scale  # [T, S]
        logits = logits.masked_fill(~index.mask(h), float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - torch.where(row_lse.isinf(), 0.0, row_lse)[:, None])  # 0 on empty rows
        out[:, h] = (probs @ values[h // G]).to(q.dtype)
        lse[:, h] = row_lse
    return out, lse
