"""Quest page selection in Triton: page bounds from the key summaries (docs/sparse-attention.md §5), then exact
attention over the chosen pages with kvcache.kernels.paged_decode MODE_PAGES.

bound_g(page) = sum_j max(q_j * max_j, q_j * min_j) = relu(q) . max + min(q, 0) . min: two dots
per block of pages, reading 2d float32 summary values per page instead of its 2*P*d K/V values.
The group's page scores and the choice follow kvcache.methods.quest (softmaxed bounds summed
over the group, here averaged: the same order; the last page always read): the bounds kernel
keeps each head's softmax stats per split, kvcache.kernels.group_scores turns them into page scores (with
the radix select's first histogram when the rows are too long to select in registers), and
kvcache.kernels.topk.select_topk picks the pages.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .csr import SUMMARY_MAX, SUMMARY_MIN, PageTableCSR
from .group_scores import group_scores
from .paged_decode import MODE_PAGES, attend_partial_and_merge, dot_precision, plan_splits
from .softmax_stats import running_softmax_stats
from .topk import LEVELS, select_topk, selects_in_registers, topk_workspace, zero_workspace_row
from .tuning import TUNING


@triton.jit
def _page_bounds_kernel(
    q_ptr, summary_ptr, indptr_ptr, indices_ptr, logits_ptr, stat_m_ptr, stat_l_ptr,
    hist0_ptr, hist1_ptr, counters_ptr,
    pages_per_split, sm_scale,
    s_qb, s_qh, s_sn, s_sh, s_sk, s_brow,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
    BLOCK_PG: tl.constexpr, ROW_MIN: tl.constexpr, ROW_MAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WS_B0: tl.constexpr, WS_B1: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    if split == 0:  # the selection's workspace, zeroed here rather than by a memset of its own
        zero_workspace_row(hist0_ptr, hist1_ptr, counters_ptr, pid_bh, WS_B0, WS_B1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    page_start = tl.load(indptr_ptr + b)
    num_pages = tl.load(indptr_ptr + b + 1) - page_start
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    mask_g = offs_g < G
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    q = q.to(tl.float32)
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.minimum(q, 0.0)
    start = split * pages_per_split
    end = tl.minimum(start + pages_per_split, num_pages)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for it in range(start, end, BLOCK_PG):
        offs_p = it + tl.arange(0, BLOCK_PG)
        mask_p = offs_p < end
        page = tl.load(indices_ptr + page_start + offs_p, mask=mask_p, other=0).to(tl.int64)
        base = page * s_sn + h * s_sh
        kmax = tl.load(summary_ptr + (base + ROW_MAX * s_sk)[:, None] + offs_d[None, :], mask=mask_p[:, None],
                       other=0.0)
        kmin = tl.load(summary_ptr + (base + ROW_MIN * s_sk)[:, None] + offs_d[None, :], mask=mask_p[:, None],
                       other=0.0)
        # tf32 is exact here for bf16/fp16 stores: their q and min/max values fit tf32's mantissa.
        bound = tl.dot(q_pos, tl.trans(kmax), input_precision=DOT_PRECISION)
        bound += tl.dot(q_neg, tl.trans(kmin), input_precision=DOT_PRECISION)
        x = tl.where(mask_p[None, :], bound * sm_scale, float("-inf"))
        tl.store(logits_ptr + (pid_bh * G + offs_g)[:, None] * s_brow + offs_p[None, :], x,
                 mask=mask_g[:, None] & mask_p[None, :])
        m_i, l_i = running_softmax_stats(m_i, l_i, x)
    stat = (pid_bh * tl.num_programs(1) + split) * G + offs_g
    tl.store(stat_m_ptr + stat, m_i, mask=mask_g)
    tl.store(stat_l_ptr + stat, l_i, mask=mask_g)


def quest_select(
    q: torch.Tensor, k_summary: torch.Tensor, csr: PageTableCSR, top_pages: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's chosen pages by the Quest bound (§3): page indexes [B*Hkv, t] int32 and their count [B*Hkv]."""
    chosen, list_len, _ = quest_select_scored(q, k_summary, csr, top_pages, scale)
    return chosen, list_len


def quest_select_scored(
    q: torch.Tensor, k_summary: torch.Tensor, csr: PageTableCSR, top_pages: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quest_select, and each query head's scaled bounds [B*Hkv, G, max_pages] float32 (scale * bound per page;
    entries past a sequence's pages are not written) from which they were chosen."""
    B, Hq, D = q.shape
    Hkv = k_summary.shape[1]
    G = Hq // Hkv
    BH = B * Hkv
    dev = q.device
    P = csr.page_size
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    max_pages = triton.cdiv(csr.max_len, P)
    launch = TUNING["quest"]
    splits, per_split = plan_splits(max_pages, BH, launch.block_n, launch.programs)
    logits = torch.empty((BH, G, max_pages), dtype=torch.float32, device=dev)
    stat_m = torch.empty((BH, splits, G), dtype=torch.float32, device=dev)
    stat_l = torch.empty((BH, splits, G), dtype=torch.float32, device=dev)
    ws = topk_workspace(BH, dev, zeroed=False)
    _page_bounds_kernel[(BH, splits)](
        q, k_summary, csr.indptr, csr.indices, logits, stat_m, stat_l, ws["hist0"], ws["hist1"], ws["counters"],
        per_split, scale,
        q.stride(0), q.stride(1), k_summary.stride(0), k_summary.stride(1), k_summary.stride(2), logits.stride(1),
        HKV=Hkv, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, BLOCK_PG=launch.block_n,
        ROW_MIN=SUMMARY_MIN, ROW_MAX=SUMMARY_MAX, DOT_PRECISION=dot_precision(q.dtype),
        WS_B0=LEVELS[0][1], WS_B1=LEVELS[1][1], num_warps=launch.num_warps,
    )
    # Page scores over [0, n_pages) of each sequence as the reference ranks them; the last page is
    # the forced tail of the selection, like SparQ's local window.
    t = min(top_pages, max_pages)
    in_registers = selects_in_registers(max_pages, BH)
    scores, counts = group_scores(logits, stat_m, stat_l, per_split, csr, Hkv, 1, ws["hist0"], pages=True, k_cap=t,
                                  with_hist=not in_registers)
    list_len = counts["k"]
    chosen = select_topk(scores, list_len, counts["n_valid"], counts["n_total"], max_pages, ws, hist0_done=True,
                         k_max=t, in_registers=in_registers)
    return chosen, list_len, logits


def quest_decode(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    k_summary: torch.Tensor,
    csr: PageTableCSR,
    top_pages: int,
    scale: float | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, d] over each group's `top_pages` best pages by the Quest bound: out, lse."""
    chosen, list_len = quest_select(q, k_summary, csr, top_pages, scale)
    return attend_partial_and_merge(
        q, k_seq, v_seq, csr, chosen.shape[1] * csr.page_size, MODE_PAGES, item_list=chosen, list_len=list_len,
        scale=scale, block_n=block_n,
    )
