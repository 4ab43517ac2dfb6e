"""Oracle page choice, for evaluation: the pages holding most of a GQA group's true attention mass.

The bound on what any page selector reading the same pages can reach (the gate of ALGORITHMS.md §3,
Quest): the choice is gate_select's rule (first and last page always, then the best pages until
the token budget) applied to the exact attention mass per page, summed over the group's query
heads (each head's probabilities sum to 1: an equal vote each). To know that mass it attends to
every position first, so it saves nothing and serves no real decode. Its bytes_read counts only
the rows of the chosen pages, as if the choice were free.
"""

from __future__ import annotations

import math

import torch

from kvcache.methods.gate import attend_chosen_pages, check_budget, gate_select
from kvcache.methods.gather import gather_sequence
from kvcache.methods.result import AttentionResult
from kvcache.methods.traffic import gate_bytes
from kvcache.store.page_table import PageTableCSR


def check_oracle_params(budget: int) -> None:
    """Raise InvalidParameter unless budget (tokens) is a positive int."""
    check_budget("oracle", budget)


def page_attention_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """Attention mass per page of grouped queries q [Hkv, G, d] over keys k [Hkv, S, d], summed over the group:
    [Hkv, n_pages] float32 (each row sums to G)."""
    Hkv, S = k.shape[0], k.shape[1]
    n = -(-S // page_size)
    probs = torch.softmax(torch.einsum("hgd,hsd->hgs", q.float(), k.float()) * scale, dim=-1).sum(1)  # [Hkv, S]
    return torch.nn.functional.pad(probs, (0, n * page_size - S)).view(Hkv, n, page_size).sum(-1)


def oracle(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    budget: int,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over the pages with the most true attention mass per group, within `budget`
    tokens (first and last page always); bytes_read: the chosen pages' rows only."""
    check_oracle_params(budget)
    B, Hq, d = q.shape
    Hkv, P = k_seq.shape[1], csr.page_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    counts = []
    for b in range(B):
        qg = q[b].view(Hkv, Hq // Hkv, d)
        mass = page_attention_mass(qg, gather_sequence(k_seq, csr, b), P, scale)
        chosen, count = gate_select(mass, P, budget)
        out[b], lse[b] = attend_chosen_pages(q[b], k_seq, v_seq, csr, b, chosen, count, scale)
        counts.append(count.tolist())
    return AttentionResult(out, lse, gate_bytes(csr.host_lens, P, counts, d, k_seq.element_size(), 0, 0))
