"""The learned gate's decode scoring in Triton (docs/sparse-attention.md §3, SeerAttention-R): the gate query of each
GQA group, its logits against the cached gate keys of the sequence's pages, and the page select's inputs, with
no host sync.

  gate_queries_triton  qg = RoPE(W_q [q_1 .. q_G] + b_q, n_pages - 1)   a [G*d x dg] GEMV per (sequence, group);
                       a pre-RoPE gate's q_i rotated back from the query's position first
  gate_scores_triton   logit(page) = qg . kg(page) / sqrt(dg) over the page table, kg from GateKeyCache

The scoring pass also writes a selection key per page for kvcache.kernels.topk's select, which ranks
non-negative float32 by their bits: key = 1 + logit (logit >= 0) or 1 / (1 - logit)
(logit < 0), strictly increasing in the logit, so the top keys are the top softmax scores; page 0
(the attention sink) gets +inf so it is always taken, and the last page is the select's forced
tail (n_valid = n_pages - 1). The select's per-row counts (pages to read, n_valid, n_total) are written
here too, and, when rows are too long to select in registers, the radix levels' level-0 histogram of the keys
over [0, n_pages - 1): saving launches.
Torch references: kvcache.methods.gate.gate_queries / gate_logits / gate_select.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import triton
import triton.language as tl

from .csr import PageTableCSR
from .paged_decode import plan_splits
from .pdl import pdl_launch, pdl_trigger, pdl_wait
from .topk import (
    LEVELS,
    add_histogram,
    digit_histogram,
    select_topk,
    selects_in_registers,
    topk_workspace,
    zero_workspace_row,
)
from .tuning import Launch

# Programs ~ 8 waves of 132 SMs (H100/H200): scoring reads dg values per page and is bandwidth-bound. 32 pages
# a step beat 64 and 128 (128K x 1 on an H100: 18.5 against 22.2 us, bench/results/gate_sweep_h100.json).
SCORE_LAUNCH = Launch(block_n=32, num_warps=4, programs=1056)  # block_n pages per loop step, ~one step per program
# The query GEMV is latency-bound (a few hundred KB of W_q per group): few loop steps, dg/8 programs per group.
QUERY_MAX_BLOCK_K = 1024  # rows of W_q per loop step: one step up to G*d = 1024
QUERY_BLOCK_O = 4  # output pairs (i, i + dg/2) per program: dg/8 programs per group
# kvcache.kernels.topk's radix digits over the page keys; 8 warps took 1-3 us off the selection of 8192 pages.
SELECT_LAUNCH = Launch(block_n=512, num_warps=8, programs=128)


@triton.jit
def _unrotated_gemv(q_ptr, w_ptr, s_wi, inv_freq_ptr, last_len_ptr, b, n_pages, offs_o, mask_o,
                    HALF: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, P: tl.constexpr):
    """(W_q^T q')[offs_o] and [HALF + offs_o] for a pre-RoPE gate: q' is the group's q [G*d] at q_ptr rotated back
    from the sequence's last position (the model's RoPE undone, half-split pairs (i, i + d/2), as
    kvcache.methods.gate.unrotate), held as the G heads' low and high halves [BG, d/2], so each angle's sin and cos
    are computed once for the group."""
    t = ((n_pages - 1) * P + tl.load(last_len_ptr + b) - 1).to(tl.float32)
    offs_g = tl.arange(0, BG)
    offs_i = tl.arange(0, D // 2)
    mask_g = offs_g < G
    row = offs_g[:, None] * D + offs_i[None, :]  # [BG, d/2]: row of W_q (and offset in q) of each low element
    lo = tl.load(q_ptr + row, mask=mask_g[:, None], other=0.0).to(tl.float32)
    hi = tl.load(q_ptr + row + D // 2, mask=mask_g[:, None], other=0.0).to(tl.float32)
    a = t * tl.load(inv_freq_ptr + offs_i)
    # Reduced to [0, 2 pi) first: past about 1e5 radians (positions past 100K) sin and cos take a slow path, which
    # cost the step 4 us at 128K on an H200. The fp32 angle is that coarse (ulp 0.008) there anyway.
    a -= 6.283185307179586 * tl.floor(a * 0.15915494309189535)
    c = tl.cos(a)[None, :]
    s = tl.sin(a)[None, :]
    lo, hi = lo * c + hi * s, hi * c - lo * s
    w = w_ptr + row[:, :, None] * s_wi + offs_o[None, None, :]  # [BG, d/2, BLOCK_O]
    m = mask_g[:, None, None] & mask_o[None, None, :]
    hi_rows = (D // 2) * s_wi
    acc_lo = tl.sum(tl.sum(lo[:, :, None] * tl.load(w, mask=m, other=0.0)
                           + hi[:, :, None] * tl.load(w + hi_rows, mask=m, other=0.0), axis=1), axis=0)
    acc_hi = tl.sum(tl.sum(lo[:, :, None] * tl.load(w + HALF, mask=m, other=0.0)
                           + hi[:, :, None] * tl.load(w + hi_rows + HALF, mask=m, other=0.0), axis=1), axis=0)
    return acc_lo, acc_hi


@triton.jit
def _gate_query_kernel(
    q_ptr, w_ptr, bias_ptr, inv_freq_ptr, indptr_ptr, last_len_ptr, model_inv_freq_ptr, qg_ptr,
    hist0_ptr, hist1_ptr, counters_ptr,
    s_qb, s_wh, s_wi, s_bh,
    HKV: tl.constexpr, GD: tl.constexpr, DG: tl.constexpr, HALF: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, ZERO_WS: tl.constexpr, WS_B0: tl.constexpr, WS_B1: tl.constexpr,
    PDL: tl.constexpr, UNROTATE: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
):
    pdl_trigger(PDL)  # the scoring kernel may start now and load its gate keys while this one runs
    pid_bh = tl.program_id(0)
    if ZERO_WS:
        # The select's workspace row, zeroed here before the scoring kernel adds its histogram: no memset.
        if tl.program_id(1) == 0:
            zero_workspace_row(hist0_ptr, hist1_ptr, counters_ptr, pid_bh, WS_B0, WS_B1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < HALF
    n_pages = tl.load(indptr_ptr + b + 1) - tl.load(indptr_ptr + b)
    if UNROTATE:
        acc_lo, acc_hi = _unrotated_gemv(q_ptr + b * s_qb + h * GD, w_ptr + h * s_wh, s_wi, model_inv_freq_ptr,
                                         last_len_ptr, b, n_pages, offs_o, mask_o, HALF, G, BG, D, P)
    else:
        acc_lo = tl.zeros([BLOCK_O], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k0 in range(0, GD, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < GD
            # The group's G query heads are adjacent in q [B, Hq, d]: its flat [G*d] starts at h*G*d.
            x = tl.load(q_ptr + b * s_qb + h * GD + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = w_ptr + h * s_wh + offs_k[:, None] * s_wi + offs_o[None, :]
            m = mask_k[:, None] & mask_o[None, :]
            acc_lo += tl.sum(x[:, None] * tl.load(w, mask=m, other=0.0), axis=0)
            acc_hi += tl.sum(x[:, None] * tl.load(w + HALF, mask=m, other=0.0), axis=0)
    acc_lo += tl.load(bias_ptr + h * s_bh + offs_o, mask=mask_o, other=0.0)
    acc_hi += tl.load(bias_ptr + h * s_bh + HALF + offs_o, mask=mask_o, other=0.0)
    # RoPE at the index of the query's page, the sequence's last (half-split layout, as gate_rope).
    pos = (n_pages - 1).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + offs_o, mask=mask_o, other=0.0)
    c = tl.cos(angle)
    s = tl.sin(angle)
    tl.store(qg_ptr + pid_bh * DG + offs_o, acc_lo * c - acc_hi * s, mask=mask_o)
    tl.store(qg_ptr + pid_bh * DG + HALF + offs_o, acc_hi * c + acc_lo * s, mask=mask_o)


@triton.jit
def _page_keys(keys_ptr, indices_ptr, page_start, it, end, h, s_kn, s_kh, offs_dg, mask_dg, BLOCK_PG: tl.constexpr):
    """Gate keys [BLOCK_PG, BLOCK_DG] float32 of a sequence's pages it .. it + BLOCK_PG (zeros past end)."""
    offs_p = it + tl.arange(0, BLOCK_PG)
    mask_p = offs_p < end
    page = tl.load(indices_ptr + page_start + offs_p, mask=mask_p, other=0).to(tl.int64)
    return tl.load(keys_ptr + (page * s_kn + h * s_kh)[:, None] + offs_dg[None, :],
                   mask=mask_p[:, None] & mask_dg[None, :], other=0.0).to(tl.float32)


@triton.jit
def _score_step(kg, qg, it, end, num_pages, row, logits_ptr, sel_ptr, sm_scale,
                BLOCK_PG: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr, WITH_HIST: tl.constexpr):
    """Logits and select keys of pages it .. it + BLOCK_PG from their gate keys kg: stored, and their level-0
    histogram returned (zeros without WITH_HIST)."""
    offs_p = it + tl.arange(0, BLOCK_PG)
    mask_p = offs_p < end
    logit = tl.sum(kg * qg[None, :], axis=1) * sm_scale
    tl.store(logits_ptr + row + offs_p, logit, mask=mask_p)
    key = tl.where(logit >= 0, 1.0 + logit, 1.0 / (1.0 - logit))
    key = tl.where(offs_p == 0, float("inf"), key)
    tl.store(sel_ptr + row + offs_p, key, mask=mask_p)
    hist = tl.zeros([NBINS], dtype=tl.int32)
    if WITH_HIST:
        hist = digit_histogram(key, mask_p & (offs_p < num_pages - 1), SHIFT, NBINS)
    return hist


@triton.jit
def _gate_score_kernel(
    qg_ptr, keys_ptr, indptr_ptr, indices_ptr,
    logits_ptr, sel_ptr, hist_ptr, list_len_ptr, n_valid_ptr, n_total_ptr,
    pages_per_split, budget_pages, sm_scale,
    s_kn, s_kh, s_row,
    HKV: tl.constexpr, DG: tl.constexpr, BLOCK_DG: tl.constexpr, BLOCK_PG: tl.constexpr,
    SHIFT: tl.constexpr, NBINS: tl.constexpr, WITH_HIST: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    page_start = tl.load(indptr_ptr + b)
    num_pages = tl.load(indptr_ptr + b + 1) - page_start
    offs_dg = tl.arange(0, BLOCK_DG)
    mask_dg = offs_dg < DG
    row = pid_bh.to(tl.int64) * s_row
    start = split * pages_per_split
    end = tl.minimum(start + pages_per_split, num_pages)
    # The first step's gate keys come from the store (in place before the step began): with PDL they load
    # while the query kernel still runs; the gate query is that kernel's, read after the wait. The first
    # step is peeled off the loop, whose body then has no branch.
    kg = _page_keys(keys_ptr, indices_ptr, page_start, start, end, h, s_kn, s_kh, offs_dg, mask_dg, BLOCK_PG)
    pdl_wait(PDL)
    qg = tl.load(qg_ptr + pid_bh * DG + offs_dg, mask=mask_dg, other=0.0)
    hist = _score_step(kg, qg, start, end, num_pages, row, logits_ptr, sel_ptr, sm_scale,
                       BLOCK_PG, SHIFT, NBINS, WITH_HIST)
    for it in range(start + BLOCK_PG, end, BLOCK_PG):
        kg = _page_keys(keys_ptr, indices_ptr, page_start, it, end, h, s_kn, s_kh, offs_dg, mask_dg, BLOCK_PG)
        hist += _score_step(kg, qg, it, end, num_pages, row, logits_ptr, sel_ptr, sm_scale,
                            BLOCK_PG, SHIFT, NBINS, WITH_HIST)
    if WITH_HIST:
        add_histogram(hist_ptr + pid_bh * NBINS, hist, NBINS)
    if split == 0:
        # Pages read: all of a short sequence, else the budget's (at least the first and last).
        take = tl.minimum(num_pages, tl.maximum(budget_pages, 2))
        tl.store(list_len_ptr + pid_bh, take)
        tl.store(n_valid_ptr + pid_bh, num_pages - 1)
        tl.store(n_total_ptr + pid_bh, num_pages)


_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def rope_inv_freq(gate_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """RoPE frequencies [dg/2] float32, computed as kvcache.methods.gate.gate_rope does (same angles); made once
    per (dg, base, device), so a decode step launches nothing for them."""
    key = (gate_dim, float(base), torch.device(device))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = base ** (-torch.arange(0, gate_dim, 2, dtype=torch.float32, device=device) / gate_dim)
    return _INV_FREQ[key]


class GateQueryWeights(Protocol):
    """What the query kernel reads of one layer's gate (the gate method's LayerGate is one)."""

    q_weight: torch.Tensor  # [Hkv, G*d, dg] float32
    q_bias: torch.Tensor  # [Hkv, dg] float32
    shape: Any  # .rope_base, .model_rope_base and .pre_rope (rotate q back to position 0 first)


def gate_queries_triton(q: torch.Tensor, layer_gate: GateQueryWeights, csr: PageTableCSR,
                        workspace: dict[str, torch.Tensor] | None = None, pdl: bool = False) -> torch.Tensor:
    """Gate queries [B*Hkv, dg] float32 of q [B, Hq, d], each at its sequence's last page (§3, SeerAttention-R).
    A `workspace` (kvcache.kernels.topk's, one row per gate query, made with zeroed=False) is zeroed on the way. With
    `pdl` (kvcache.kernels.pdl) the next kernel may launch while this one runs (it is the first of the chain)."""
    B, _, D = q.shape
    w, bias = layer_gate.q_weight, layer_gate.q_bias  # [Hkv, G*d, dg], [Hkv, dg] float32
    Hkv, GD, DG = w.shape
    if q.stride(2) != 1 or q.stride(1) != D or w.stride(2) != 1 or bias.stride(1) != 1 or DG % 2:
        raise ValueError("gate query: q and the weights must be contiguous in their last dims, dg even")
    if layer_gate.shape.pre_rope and (D & (D - 1) or D < 2):
        raise ValueError(f"gate query: a pre-RoPE gate's kernel takes a power-of-two head dim, not {D}")
    half = DG // 2
    qg = torch.empty((B * Hkv, DG), dtype=torch.float32, device=q.device)
    shape = layer_gate.shape
    inv_freq = rope_inv_freq(DG, shape.rope_base, q.device)
    model_inv_freq = rope_inv_freq(D, shape.model_rope_base, q.device) if shape.pre_rope else inv_freq
    ws = workspace or {"hist0": qg, "hist1": qg, "counters": qg}
    _gate_query_kernel[(B * Hkv, triton.cdiv(half, QUERY_BLOCK_O))](
        q, w, bias, inv_freq, csr.indptr, csr.last_page_len, model_inv_freq, qg, ws["hist0"], ws["hist1"],
        ws["counters"],
        q.stride(0), w.stride(0), w.stride(1), bias.stride(0),
        HKV=Hkv, GD=GD, DG=DG, HALF=half, BLOCK_K=min(QUERY_MAX_BLOCK_K, triton.next_power_of_2(GD)),
        BLOCK_O=QUERY_BLOCK_O, ZERO_WS=bool(workspace), WS_B0=LEVELS[0][1], WS_B1=LEVELS[1][1],
        PDL=pdl, UNROTATE=shape.pre_rope, G=GD // D, BG=triton.next_power_of_2(GD // D), D=D, P=csr.page_size,
        num_warps=8,
    )
    return qg


@torch.no_grad()
def gate_scores_triton(
    qg: torch.Tensor, keys: torch.Tensor, csr: PageTableCSR, budget_pages: int,
    workspace: dict[str, torch.Tensor] | None = None, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logits [B*Hkv, max_pages] float32 of gate queries qg [B*Hkv, dg] against keys [N, Hkv, dg] of the
    sequences' pages, with the select's inputs: (logits, keys for the select, per-row counts, workspace).
    The workspace (kvcache.kernels.topk's, level-0 histogram filled) is empty when select_pages selects in registers;
    pass one that gate_queries_triton zeroed (select_workspace), else a zeroed one is made here.

    counts holds list_len (pages to read, first and last included), n_valid and n_total (int32 [B*Hkv]);
    entries of a row past its sequence's pages are not written. With `pdl` (kvcache.kernels.pdl) it launches as
    following gate_queries_triton's kernel."""
    BH, DG = qg.shape
    Hkv = keys.shape[1]
    dev = qg.device
    max_pages = max(1, triton.cdiv(csr.max_len, csr.page_size))
    logits = torch.empty((BH, max_pages), dtype=torch.float32, device=dev)
    sel = torch.empty_like(logits)
    counts = {name: torch.empty(BH, dtype=torch.int32, device=dev) for name in ("list_len", "n_valid", "n_total")}
    in_registers = _selects_in_registers(csr, BH)
    ws = {} if in_registers else (workspace or topk_workspace(BH, dev))
    hist0 = logits if in_registers else ws["hist0"]
    splits, per_split = plan_splits(max_pages, BH, SCORE_LAUNCH.block_n, SCORE_LAUNCH.programs)
    shift, bits = LEVELS[0]
    _gate_score_kernel[(BH, splits)](
        qg, keys, csr.indptr, csr.indices,
        logits, sel, hist0, counts["list_len"], counts["n_valid"], counts["n_total"],
        per_split, budget_pages, 1.0 / math.sqrt(DG),
        keys.stride(0), keys.stride(1), logits.stride(0),
        HKV=Hkv, DG=DG, BLOCK_DG=triton.next_power_of_2(DG), BLOCK_PG=SCORE_LAUNCH.block_n,
        SHIFT=shift, NBINS=1 << bits, WITH_HIST=not in_registers, PDL=pdl, num_warps=SCORE_LAUNCH.num_warps,
        **pdl_launch(pdl),
    )
    return logits, sel, counts, ws


def _selects_in_registers(csr: PageTableCSR, rows: int) -> bool:
    return selects_in_registers(max(1, triton.cdiv(csr.max_len, csr.page_size)), rows)


def select_workspace(rows: int, csr: PageTableCSR, device: torch.device) -> dict[str, torch.Tensor]:
    """The radix select's workspace for `rows` gate queries over csr's sequences, unzeroed (gate_queries_triton
    zeroes it), or {} when the rows are short enough to select in registers."""
    if _selects_in_registers(csr, rows):
        return {}
    return topk_workspace(rows, device, zeroed=False)


def select_pages(sel: torch.Tensor, counts: dict[str, torch.Tensor], ws: dict[str, torch.Tensor],
                 k_max: int, pdl: bool = False) -> torch.Tensor:
    """Page indexes [B*Hkv, k_max] int32 (unordered, row r filled up to list_len[r]) of the select over the keys
    gate_scores_triton wrote: page 0, the last page, and the best between (kvcache.kernels.topk.select_topk: one program
    per row when the workspace is empty, else the radix levels, whose level-0 histogram the scoring pass filled).
    With `pdl` (kvcache.kernels.pdl) it launches as following the scoring kernel."""
    return select_topk(sel, counts["list_len"], counts["n_valid"], counts["n_total"], sel.shape[1], ws,
                       hist0_done=True, k_max=k_max, launch=SELECT_LAUNCH, pdl=pdl, in_registers=not ws)
