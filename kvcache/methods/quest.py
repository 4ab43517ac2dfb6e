"""Quest page selection, torch reference: page scores from key summaries (ALGORITHMS.md §3), exact attention on chosen pages."""

from __future__ import annotations

import math

import torch

from kvcache.errors import InvalidParameter
from kvcache.methods.dense import attend_rows
from kvcache.methods.result import AttentionResult
from kvcache.methods.traffic import quest_bytes
from kvcache.store.page_pool import SUMMARY_MAX, SUMMARY_MIN
from kvcache.store.page_table import PageTableCSR


def quest_page_scores(q: torch.Tensor, summary: torch.Tensor, scale: float) -> torch.Tensor:
    """Page scores of a GQA group: q [Hkv, G, d], summary [n, Hkv, 3, d] -> [Hkv, n].

    §3: each head's bound on q.k over a page is sum_j max(q_j * max_j, q_j * min_j). A group
    reads one set of pages, so, as SparQ sums shat over the group (§1), each head's bounds are
    softmaxed over pages (at the attention scale) and summed: every head gets an equal vote. On
    the demo's data this covers more of every head's attention mass than the max or the sum of
    raw bounds, which let one head's large logits outvote the others.
    """
    kmin = summary[:, :, SUMMARY_MIN].float().transpose(0, 1)  # [Hkv, n, d]
    kmax = summary[:, :, SUMMARY_MAX].float().transpose(0, 1)
    qf = q.float()[:, :, None, :]  # [Hkv, G, 1, d]
    bound = torch.maximum(qf * kmax[:, None], qf * kmin[:, None]).sum(-1)  # [Hkv, G, n]
    return torch.softmax(bound * scale, dim=-1).sum(dim=1)


def select_pages(scores: torch.Tensor, top_pages: int) -> torch.Tensor:
    """Indices of the chosen pages per kv head [Hkv, min(top_pages, n)]: the last page plus the best others."""
    n = scores.shape[-1]
    if top_pages >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n)
    best = torch.topk(scores[:, : n - 1], top_pages - 1, dim=-1).indices
    last = torch.full((scores.shape[0], 1), n - 1, device=scores.device, dtype=best.dtype)
    return torch.cat((best, last), dim=-1)


def check_quest_params(top_pages: int) -> None:
    """Raise InvalidParameter unless top_pages is a positive int."""
    if not isinstance(top_pages, int) or isinstance(top_pages, bool) or top_pages < 1:
        raise InvalidParameter(f"quest: top_pages={top_pages!r} must be a positive int")


def quest(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    k_summary: torch.Tensor,
    csr: PageTableCSR,
    top_pages: int,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over the `top_pages` pages with the highest Quest bound (last page always)."""
    check_quest_params(top_pages)
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    P = csr.page_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b, S in enumerate(csr.host_lens):
        qg = q[b].view(Hkv, Hq // Hkv, d)
        pages = csr.pages_of(b)
        chosen = select_pages(quest_page_scores(qg, k_summary[pages], scale), top_pages)  # [Hkv, t]
        # Rows of the chosen pages only; rows past S (in the last page) are masked out.
        page_ids = pages[chosen]  # [Hkv, t]
        heads = torch.arange(Hkv, device=q.device)[:, None]
        k_rows = k_seq[page_ids, heads].flatten(1, 2)  # [Hkv, t*P, d]
        v_rows = v_seq[page_ids, heads].flatten(1, 2)
        positions = (chosen[..., None] * P + torch.arange(P, device=q.device)).flatten(1)  # [Hkv, t*P]
        valid = positions < S
        y, s = attend_rows(qg, k_rows, v_rows, scale, mask=valid)
        out[b], lse[b] = y.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return AttentionResult(out, lse, quest_bytes(csr.host_lens, P, top_pages, Hkv, d, k_seq.element_size()))
