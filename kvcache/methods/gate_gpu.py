"""Learned page gate (ALGORITHMS.md §3, SeerAttention-R decode) on the Triton path: gate query, scores against
the cached gate keys, radix top-k of the pages, then exact attention over them with kvcache.kernels.paged_decode
MODE_PAGES (the page-list attention Quest uses).

With a token budget the step has no host sync and no per-sequence Python loop, so it can be
captured in a CUDA graph: every count is on the device, the host plans from csr.host_lens only.
With a threshold the number of pages is data-dependent: the scores come from the same kernels and
the choice from gate_select_rows (torch, every group at once); only the bytes counted need a sync.
"""

from __future__ import annotations

import torch
import triton

from kvcache.kernels.gate_score import gate_queries_triton, gate_scores_triton, select_pages, select_workspace
from kvcache.kernels.paged_decode import MODE_PAGES, attend_partial_and_merge
from kvcache.kernels.pdl import pdl_for_rows
from kvcache.methods.gate import LayerGate, check_gate_params, gate_keys, gate_pooled, gate_select_rows, pooled_keys
from kvcache.methods.gather import gather_sequence
from kvcache.methods.traffic import gate_budget_pages, gate_bytes
from kvcache.store.page_table import PageTableCSR


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
        return chosen, counts["list_len"]
    # The count per group is data-dependent; all groups are chosen at once, still without a sync.
    chosen, count = gate_select_rows(logits, csr.page_counts().repeat_interleave(Hkv), P, budget, threshold)
    return chosen.to(torch.int32), count.to(torch.int32)


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
