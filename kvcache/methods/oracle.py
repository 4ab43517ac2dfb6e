"""Oracle page choice, for evaluation: the pages holding most of a GQA group's true attention mass.

The bound on what any page selector reading the same pages can reach (the gate of docs/sparse-attention.md §3,
Quest; the oracle is §6): the choice is gate_select's rule (first and last page always, then the best pages until
the token budget) applied to the exact attention mass per page, summed over the group's query
heads (each head's probabilities sum to 1: an equal vote each). To know that mass it attends to
every position first, so it saves nothing and serves no real decode. Its bytes_read counts only
the rows of the chosen pages, as if the choice were free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcache.config import KVCacheConfig
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_PAGES
from kvcache.methods.base import REQUIRED, AttentionMethod, Params, Selection, param, scale_of
from kvcache.methods.coverage import chosen_share, reference_args
from kvcache.methods.gate import attend_chosen_pages, check_budget, gate_budget_for_share, gate_budget_pages, gate_bytes
from kvcache.methods.gate_model import gate_select
from kvcache.methods.gather import gather_sequence
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult


def check_oracle_params(budget: int) -> None:
    """Raise InvalidParameter unless budget (tokens) is a positive int."""
    check_budget("oracle", budget)


def page_head_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """Attention mass per page of each query head of q [Hkv, G, d] over keys k [Hkv, S, d]: [Hkv, G, n_pages] float32
    (each head's row sums to 1)."""
    Hkv, S = k.shape[0], k.shape[1]
    G = q.shape[1]
    n = -(-S // page_size)
    probs = torch.softmax(torch.einsum("hgd,hsd->hgs", q.float(), k.float()) * scale, dim=-1)  # [Hkv, G, S]
    return torch.nn.functional.pad(probs, (0, n * page_size - S)).view(Hkv, G, n, page_size).sum(-1)


def page_attention_mass(q: torch.Tensor, k: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """Attention mass per page of grouped queries q [Hkv, G, d] over keys k [Hkv, S, d], summed over the group:
    [Hkv, n_pages] float32 (each row sums to G)."""
    return page_head_mass(q, k, page_size, scale).sum(1)


def oracle_pick(q: torch.Tensor, k: torch.Tensor, page_size: int, scale: float, budget: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's choice (gate_select on the group's true page masses: chosen [Hkv, t], count [Hkv]) and each
    query head's exact share of attention mass on the chosen pages [Hkv, G]."""
    mass = page_head_mass(q, k, page_size, scale)
    chosen, count = gate_select(mass.sum(1), page_size, budget)
    return chosen, count, chosen_share(mass, chosen, count)


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
    coverage = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    counts = []
    for b in range(B):
        qg = q[b].view(Hkv, Hq // Hkv, d)
        chosen, count, share = oracle_pick(qg, gather_sequence(k_seq, csr, b), P, scale, budget)
        out[b], lse[b] = attend_chosen_pages(q[b], k_seq, v_seq, csr, b, chosen, count, scale)
        coverage[b] = share.reshape(Hq).clamp(0.0, 1.0)
        counts.append(count.tolist())
    return AttentionResult(out, lse, gate_bytes(csr.host_lens, P, counts, d, k_seq.element_size(), 0, 0),
                           coverage=coverage)


@dataclass(frozen=True, kw_only=True)
class OracleParams(Params):
    """The oracle's parameters (docs/sparse-attention.md §6)."""

    budget: int = param(REQUIRED, doc="tokens of the pages read per kv head, first and last page included", lo=1)


class Oracle(AttentionMethod):
    """Evaluation only: the pages with the most true attention mass; bytes count only the chosen pages' rows."""

    name = "oracle"
    Params = OracleParams
    evaluation_only = True
    batchable = False  # its choice reads every key: never worth sharing a call for
    doc = "evaluation only: the pages holding most of the true attention mass, within a token budget"

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: OracleParams) -> int:
        pages = [[gate_budget_pages(S, config.page_size, p.budget)] * config.num_kv_heads for S in lens]
        return gate_bytes(lens, config.page_size, pages, config.head_dim, config.itemsize, 0, 0)

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: OracleParams) -> AttentionResult:
        view = inputs.view
        return oracle(q, view.k_seq, view.v_seq, inputs.csr, **reference_args(p))

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: OracleParams) -> Selection:
        B, Hq, d = q.shape
        Hkv, P = inputs.num_kv_heads, inputs.csr.page_size
        scale = scale_of(p, d)
        picks = [oracle_pick(q[b].view(Hkv, Hq // Hkv, d), inputs.keys(b), P, scale, p.budget) for b in range(B)]
        width = max(chosen.shape[1] for chosen, _, _ in picks)
        items = torch.zeros((B * Hkv, width), dtype=torch.long, device=q.device)
        for b, (chosen, _, _) in enumerate(picks):
            items[b * Hkv : (b + 1) * Hkv, : chosen.shape[1]] = chosen
        count = torch.cat([c for _, c, _ in picks]).to(torch.int32)
        share = torch.cat([s for _, _, s in picks])
        nbytes = gate_bytes(inputs.csr.host_lens, P, [c.tolist() for _, c, _ in picks], d,
                            inputs.store.config.itemsize, 0, 0)
        return Selection(MODE_PAGES, items, count, bytes_read=nbytes, estimate=lambda: share)

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        # No scoring cost: the bound on any selector reading that many rows.
        return OracleParams(budget=gate_budget_for_share(context, page_size, share, head_dim, itemsize, 0,
                                                         itemsize))


ORACLE = Oracle()
