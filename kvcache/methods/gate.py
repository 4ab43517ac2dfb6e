"""The learned page gate as a decode method (docs/sparse-attention.md §3, SeerAttention-R decode): the pages a layer's
gate scores best, first and last always, within a token budget or above a probability threshold; exact attention
over them. The torch reference, the selection on the device, the Triton selection, the bytes it reads.

With a token budget the Triton step has no host sync and no per-sequence Python loop, so it can be captured in a
CUDA graph: every count is on the device, the host plans from csr.host_lens only. With a threshold the number of
pages is data-dependent: the scores come from the same kernels and the choice from gate_select_rows (torch, every
group at once); only the bytes counted need a sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.gate_score import gate_queries_triton, gate_scores_triton, select_pages, select_workspace
from kvcache.kernels.paged_decode import MODE_PAGES, attend_partial_and_merge
from kvcache.kernels.pdl import pdl_for_rows
from kvcache.methods.base import AttentionMethod, Params, Selection, param
from kvcache.methods.coverage import chosen_mass, reference_args
from kvcache.methods.dense import DenseParams, attend_rows
from kvcache.methods.gate_model import (
    GATE_DIM,
    LayerGate,
    gate_keys,
    gate_logits,
    gate_pooled,
    gate_select,
    gate_select_rows,
    pooled_keys,
)
from kvcache.methods.gather import gather_sequence
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult

# The gate scores a page by its cached gate key kg = RoPE(W_k [max, min, mean], page),
# dg values in the key cache's dtype (kvcache.methods.gate_store.GateKeyCache), not by its 3d float32 summaries: the
# summaries are read once, when a page's keys are appended. The gate's query weights ([G*d x dg] per kv head,
# float32) are model parameters like the model's own projections and are not counted as cache traffic;
# bench/decode.py counts them in its gate.score row.


def gate_budget_pages(S: int, page_size: int, budget: int | None) -> int:
    """Pages a gate with a token `budget` reads of a sequence of S positions (first and last included)."""
    n = -(-S // page_size)
    return n if budget is None or n <= 2 else min(n, max(2, -(-budget // page_size)))


def gate_key_bytes(num_pages: int, gate_dim: int, key_itemsize: int) -> int:
    """Bytes gate scoring reads per kv head of a sequence of `num_pages` pages: one cached gate key per page."""
    return num_pages * gate_dim * key_itemsize


def gate_bytes(lens: Sequence[int], page_size: int, pages_read: Sequence[Sequence[int]], d: int, itemsize: int,
               gate_dim: int, key_itemsize: int) -> int:
    """Learned gate (§3), per kv head: the cached gate key (gate_dim values of key_itemsize bytes) of every page,
    then the filled K/V rows of the pages it chose; pages_read[b][h] counts them for kv head h of sequence b
    (the last page among them)."""
    total = 0
    for S, per_head in zip(lens, pages_read):
        n = -(-S // page_size)
        last_rows = S - (n - 1) * page_size
        for t in per_head:
            rows = S if t >= n else (t - 1) * page_size + last_rows
            total += gate_key_bytes(n, gate_dim, key_itemsize) + 2 * rows * d * itemsize
    return total


def gate_budget_for_share(context: int, page_size: int, share: float, d: int, itemsize: int, gate_dim: int,
                          key_itemsize: int) -> int:
    """A token budget whose gate reads (gate_bytes) come to `share` of dense's 2*d*itemsize bytes per position,
    rounded down to whole pages, at least 2 pages: budget = S * (share - dg*key_itemsize / (2*P*d*itemsize))."""
    scoring = gate_dim * key_itemsize / (2 * page_size * d * itemsize)
    return max(2 * page_size, int(context * (share - scoring)) // page_size * page_size)


def check_budget(method: str, budget: object) -> None:
    """Raise InvalidParameter, naming `method`, unless budget (tokens) is a positive int."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise InvalidParameter(f"{method}: budget={budget!r} must be a positive int (tokens)")


def check_gate_params(budget: int | None, threshold: float | None) -> None:
    """Raise InvalidParameter unless budget (tokens) is a positive int or None, threshold in [0, 1] or None,
    and at least one is given."""
    if budget is None and threshold is None:
        raise InvalidParameter("gate: give a token budget, a threshold, or both")
    if budget is not None:
        check_budget("gate", budget)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise InvalidParameter(f"gate: threshold={threshold!r} must be a number in [0, 1]")


def gate_pick(layer_gate: LayerGate, qg: torch.Tensor, summary: torch.Tensor | None, keys: torch.Tensor | None,
              page_size: int, budget: int | None, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """One sequence's choice (gate_select: chosen [Hkv, t], count [Hkv]) for its groups qg [Hkv, G, d], and each
    query head's coverage estimate [Hkv, G]: the gate's softmax over all the sequence's pages summed over the chosen
    ones (what the gate was trained to predict: the group's attention mass per page)."""
    logits = gate_logits(layer_gate, qg, summary, keys)  # [Hkv, n]
    chosen, count = gate_select(torch.softmax(logits, dim=-1), page_size, budget, threshold)
    # Detached: the gate's weights may be trainable parameters, and the estimate is a reading, not a loss.
    return chosen, count, chosen_mass(logits.detach()[:, None, :], chosen, count).expand(-1, qg.shape[1])


def gate_choose(q: torch.Tensor, k_summary: torch.Tensor, layer_gate: LayerGate, csr: PageTableCSR,
                budget: int | None, threshold: float | None,
                k_seq: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """gate_pick's (chosen [Hkv, t], count [Hkv], coverage [Hkv, G]) of every sequence of q [B, Hq, d] (a pre-RoPE
    gate reads the pages' keys, k_seq [N, Hkv, P, d])."""
    B, Hq, d = q.shape
    Hkv = k_summary.shape[1]
    picks = []
    for b in range(B):
        qg = q[b].view(Hkv, Hq // Hkv, d)
        keys = gather_sequence(k_seq, csr, b) if layer_gate.shape.pre_rope else None
        picks.append(gate_pick(layer_gate, qg, k_summary[csr.pages_of(b)], keys, csr.page_size, budget, threshold))
    return picks


def attend_chosen_pages(
    q: torch.Tensor, k_seq: torch.Tensor, v_seq: torch.Tensor, csr: PageTableCSR, b: int, chosen: torch.Tensor,
    count: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of sequence b's query q [Hq, d] over the pages gate_select chose per kv head (chosen [Hkv, t],
    the first count[h] of row h): out [Hq, d] in q's dtype, lse [Hq]."""
    Hq, d = q.shape
    Hkv, P, S = k_seq.shape[1], csr.page_size, csr.host_lens[b]
    page_ids = csr.pages_of(b)[chosen]  # [Hkv, t]
    heads = torch.arange(Hkv, device=q.device)[:, None]
    k_rows = k_seq[page_ids, heads].flatten(1, 2)  # [Hkv, t*P, d]
    v_rows = v_seq[page_ids, heads].flatten(1, 2)
    positions = (chosen[..., None] * P + torch.arange(P, device=q.device)).flatten(1)  # [Hkv, t*P]
    # Padding slots (past count) repeat the last page: masked out with the rows past S.
    slot_ok = (torch.arange(chosen.shape[1], device=q.device)[None, :] < count[:, None]).repeat_interleave(P, 1)
    y, s = attend_rows(q.view(Hkv, Hq // Hkv, d), k_rows, v_rows, scale, mask=(positions < S) & slot_ok)
    return y.reshape(Hq, d).to(q.dtype), s.reshape(Hq)


def gate(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    k_summary: torch.Tensor,
    layer_gate: LayerGate,
    csr: PageTableCSR,
    budget: int | None = None,
    threshold: float | None = None,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over the pages the gate picks (first and last always); bytes read as
    the served step reads them (traffic.gate_bytes): every page's cached gate key, the chosen pages' rows."""
    check_gate_params(budget, threshold)
    B, Hq, d = q.shape
    P = csr.page_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    coverage = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    counts = []
    for b, (chosen, count, mass) in enumerate(gate_choose(q, k_summary, layer_gate, csr, budget, threshold, k_seq)):
        out[b], lse[b] = attend_chosen_pages(q[b], k_seq, v_seq, csr, b, chosen, count, scale)
        coverage[b] = mass.reshape(Hq).clamp(0.0, 1.0)
        counts.append(count.tolist())
    itemsize = k_seq.element_size()
    nbytes = gate_bytes(csr.host_lens, P, counts, d, itemsize, layer_gate.shape.gate_dim,
                        layer_gate.key_itemsize(itemsize))
    return AttentionResult(out, lse, nbytes, coverage=coverage)


def keys_for(layer_gate: LayerGate, k_summary: torch.Tensor, csr: PageTableCSR,
             k_seq: torch.Tensor | None = None) -> torch.Tensor:
    """The gate keys [N, Hkv, dg] scoring reads: the store's cache, or (a gate given without one) the keys of
    the csr's pages computed now by the reference (gate_pooled: from their summaries, or for a pre-RoPE gate
    from their rows in k_seq)."""
    if layer_gate.keys is not None:
        return layer_gate.keys
    N, Hkv = k_summary.shape[:2]
    keys = torch.zeros((N, Hkv, layer_gate.shape.gate_dim), dtype=torch.float32, device=k_summary.device)
    if not layer_gate.shape.pre_rope:
        pages = csr.indices.long()
        keys[pages] = gate_keys(layer_gate, pooled_keys(k_summary[pages]), csr.page_indexes())
        return keys
    for b in range(len(csr.host_lens)):
        pages = csr.pages_of(b)
        keys[pages] = gate_keys(layer_gate, gate_pooled(layer_gate, None, gather_sequence(k_seq, csr, b)))
    return keys


def gate_choose_triton(
    q: torch.Tensor, k_summary: torch.Tensor, layer_gate: LayerGate, csr: PageTableCSR, budget: int | None,
    threshold: float | None = None, pdl: bool = False, k_seq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's chosen page indexes [B*Hkv, t] int32 and their count [B*Hkv] int32 (§3 selection). With
    `pdl` (kvcache.kernels.pdl) its kernels launch as one dependent chain."""
    chosen, count, _ = gate_choose_triton_scored(q, k_summary, layer_gate, csr, budget, threshold, pdl, k_seq)
    return chosen, count


def gate_choose_triton_scored(
    q: torch.Tensor, k_summary: torch.Tensor, layer_gate: LayerGate, csr: PageTableCSR, budget: int | None,
    threshold: float | None = None, pdl: bool = False, k_seq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_choose_triton, and the gate logits [B*Hkv, max_pages] float32 the pages were chosen by (entries past a
    sequence's pages are not written)."""
    Hkv = k_summary.shape[1]
    P = csr.page_size
    max_pages = max(1, triton.cdiv(csr.max_len, P))
    budget_pages = max_pages if budget is None else triton.cdiv(budget, P)
    ws = select_workspace(q.shape[0] * Hkv, csr, q.device) if threshold is None else None
    keys = keys_for(layer_gate, k_summary, csr, k_seq)  # before the chain: the scoring kernel may read them early
    qg = gate_queries_triton(q, layer_gate, csr, ws, pdl=pdl)
    logits, sel, counts, ws = gate_scores_triton(qg, keys, csr, budget_pages, ws, pdl=pdl)
    if threshold is None:
        chosen = select_pages(sel, counts, ws, gate_budget_pages(csr.max_len, P, budget), pdl=pdl)
        return chosen, counts["list_len"], logits
    # The count per group is data-dependent; all groups are chosen at once, still without a sync.
    chosen, count = gate_select_rows(logits, csr.page_counts().repeat_interleave(Hkv), P, budget, threshold)
    return chosen.to(torch.int32), count.to(torch.int32), logits


def gate_decode(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    k_summary: torch.Tensor,
    layer_gate: LayerGate,
    csr: PageTableCSR,
    budget: int | None = None,
    threshold: float | None = None,
    scale: float | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Attention of q [B, Hq, d] over the pages the gate picks per group: out, lse, bytes read (traffic.gate_bytes)."""
    check_gate_params(budget, threshold)
    Hkv = k_seq.shape[1]
    P = csr.page_size
    pdl = threshold is None and pdl_for_rows(q.device, q.shape[0] * Hkv)
    chosen, list_len = gate_choose_triton(q, k_summary, layer_gate, csr, budget, threshold, pdl, k_seq)
    out, lse = attend_partial_and_merge(
        q, k_seq, v_seq, csr, chosen.shape[1] * P, MODE_PAGES, item_list=chosen, list_len=list_len,
        scale=scale, block_n=block_n, pdl=pdl,  # the select's kernel made the lists
    )
    if threshold is None:  # the count follows from the budget: no device sync
        counts = [[gate_budget_pages(S, P, budget)] * Hkv for S in csr.host_lens]
    else:
        counts = list_len.view(-1, Hkv).tolist()
    itemsize = k_seq.element_size()
    nbytes = gate_bytes(csr.host_lens, P, counts, q.shape[2], itemsize, layer_gate.shape.gate_dim,
                        layer_gate.key_itemsize(itemsize))
    return out, lse, nbytes


@dataclass(frozen=True, kw_only=True)
class GateParams(Params):
    """The gate's parameters (docs/sparse-attention.md §3): a token budget, a threshold, or both."""

    budget: int | None = param(None, doc="tokens of the pages read per kv head, first and last page included", lo=1,
                               cli="2048 unless a threshold is given")
    threshold: float | None = param(None, doc="least gate probability of a page read, renormalised over the pages "
                                              "between the first and the last", lo=0.0, hi=1.0)


class Gate(AttentionMethod):
    """The store's trained page gate picks pages; exact attention over them."""

    name = "gate"
    Params = GateParams
    needs_gate = True
    batchable = False  # its bytes depend on the gate file (key dim, key dtype) and, with a threshold, on the data
    doc = "learned page gate (SeerAttention-R): the pages the store's gate scores best, within a token budget"

    def check(self, config: KVCacheConfig, lens: Sequence[int], p: GateParams) -> None:
        check_gate_params(p.budget, p.threshold)

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: GateParams) -> int:
        # The budget's bound, for a gate of the default dimension keeping its keys in the KV dtype; the paths return
        # exact bytes.
        pages = [[gate_budget_pages(S, config.page_size, p.budget)] * config.num_kv_heads for S in lens]
        return gate_bytes(lens, config.page_size, pages, config.head_dim, config.itemsize, GATE_DIM,
                          config.itemsize)

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: GateParams) -> AttentionResult:
        view = inputs.view
        return gate(q, view.k_seq, view.v_seq, view.k_summary, inputs.layer_gate, inputs.csr, **reference_args(p))

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: GateParams) -> Selection:
        B, Hq, d = q.shape
        Hkv = inputs.num_kv_heads
        csr, layer_gate = inputs.csr, inputs.layer_gate
        picks = []
        for b in range(B):
            keys = inputs.keys(b) if layer_gate.shape.pre_rope else None
            picks.append(gate_pick(layer_gate, q[b].view(Hkv, Hq // Hkv, d), inputs.view.k_summary[csr.pages_of(b)],
                                   keys, csr.page_size, p.budget, p.threshold))
        width = max(chosen.shape[1] for chosen, _, _ in picks)
        items = torch.zeros((B * Hkv, width), dtype=torch.long, device=q.device)
        for b, (chosen, _, _) in enumerate(picks):
            items[b * Hkv : (b + 1) * Hkv, : chosen.shape[1]] = chosen
        count = torch.cat([c for _, c, _ in picks]).to(torch.int32)
        mass = torch.cat([m for _, _, m in picks])
        itemsize = inputs.store.config.itemsize
        nbytes = gate_bytes(csr.host_lens, csr.page_size, [c.tolist() for _, c, _ in picks], d, itemsize,
                            layer_gate.shape.gate_dim, layer_gate.key_itemsize(itemsize))
        return Selection(MODE_PAGES, items, count, bytes_read=nbytes, estimate=lambda: mass)

    def select_gpu(self, q: torch.Tensor, inputs: LayerInputs, p: GateParams) -> Selection:
        csr, layer_gate = inputs.csr, inputs.layer_gate
        Hkv = inputs.num_kv_heads
        P = csr.page_size
        pdl = p.threshold is None and inputs.store.tiers is None and pdl_for_rows(q.device, q.shape[0] * Hkv)
        k_seq = None if inputs.tiered else inputs.view.k_seq
        chosen, list_len, logits = gate_choose_triton_scored(q, inputs.view.k_summary, layer_gate, csr, p.budget,
                                                             p.threshold, pdl, k_seq)
        if p.threshold is None:  # the count follows from the budget: no device sync
            counts = [[gate_budget_pages(S, P, p.budget)] * Hkv for S in csr.host_lens]
        else:
            counts = list_len.view(-1, Hkv).tolist()
        itemsize = inputs.store.config.itemsize
        nbytes = gate_bytes(csr.host_lens, P, counts, q.shape[2], itemsize, layer_gate.shape.gate_dim,
                            layer_gate.key_itemsize(itemsize))
        pages = csr.page_counts().repeat_interleave(Hkv)
        G = q.shape[1] // Hkv
        return Selection(MODE_PAGES, chosen, list_len, bytes_read=nbytes, pdl=pdl,
                         estimate=lambda: chosen_mass(logits[:, None, :], chosen, list_len, pages).expand(-1, G))

    def shard(self, p: GateParams, held: Sequence[int], totals: Sequence[int], starts: Sequence[int], is_last: bool,
              page_size: int) -> tuple[str, Params] | None:
        # The token budget split like SparQ's k, the threshold kept. Each shard's gate scores the shard's own pages at
        # the shard's own page positions (its RoPE sees shard page i at position i), which adds to the approximation.
        if p.budget is None:
            return self.name, p
        share = sum(held) / max(sum(totals), 1)
        budget = max(page_size, round(p.budget * share))
        if p.threshold is None and budget >= max(held):
            return "dense", DenseParams(scale=p.scale)
        return self.name, replace(p, budget=budget)

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        return GateParams(budget=gate_budget_for_share(context, page_size, share, head_dim, itemsize, GATE_DIM,
                                                       itemsize))

    def from_flags(self, values: dict) -> dict:
        if values.get("budget") is None and values.get("threshold") is None:
            values["budget"] = 2048  # a token budget when neither limit is given
        return values


GATE = Gate()
