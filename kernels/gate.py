"""Learned page gate (ALGORITHMS.md §3) on the Triton path: the gate's page scores and choice in torch
(kvcache.methods.gate: a [G*d x dg] and a [3d x dg] product per group, tiny next to the pages), then
exact attention over the chosen pages with kernels.paged_decode MODE_PAGES, as Quest does."""

from __future__ import annotations

import torch

from kernels.paged_decode import MODE_PAGES, attend_partial_and_merge
from kvcache.methods.gate import LayerGate, check_gate_params, gate_choose
from kvcache.methods.traffic import gate_budget_pages, gate_bytes
from kvcache.table import PageTableCSR


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
    """Attention of q [B, Hq, d] over the pages the gate picks per group: out, lse, bytes read."""
    check_gate_params(budget, threshold)
    picks = gate_choose(q, k_summary, layer_gate, csr, budget, threshold)
    t_max = max(chosen.shape[1] for chosen, _ in picks)
    Hkv = k_seq.shape[1]
    chosen_all = torch.zeros((len(picks) * Hkv, t_max), dtype=torch.int32, device=q.device)
    for b, (chosen, _) in enumerate(picks):
        chosen_all[b * Hkv : (b + 1) * Hkv, : chosen.shape[1]] = chosen.to(torch.int32)
    list_len = torch.cat([count for _, count in picks]).to(torch.int32)
    out, lse = attend_partial_and_merge(
        q, k_seq, v_seq, csr, t_max * csr.page_size, MODE_PAGES, item_list=chosen_all, list_len=list_len,
        scale=scale, block_n=block_n,
    )
    if threshold is None:  # the count follows from the budget: no device sync
        counts = [[gate_budget_pages(S, csr.page_size, budget)] * Hkv for S in csr.host_lens]
    else:
        counts = [count.tolist() for _, count in picks]
    return out, lse, gate_bytes(csr.host_lens, csr.page_size, counts, q.shape[2], k_seq.element_size())
