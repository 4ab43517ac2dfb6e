"""SparQ's top-k (ALGORITHMS.md §1 step 4) straight from stage 1's logits: a sampled bracket, one pass, an exact finish.

A position's score is the group mean of shat_g, f = sum_g exp(x_g - m_g) / (G l_g), from stage 1's
logits x_g and softmax stats (the mean ranks like §1's sum). The window's l positions are always
taken; the k - l largest f of the others are chosen in two launches, and f is never written:

  bracket  one program per (sequence, kv head): f at SAMPLES evenly spaced positions, sorted. The
           chosen count's expected rank among them, +- MARGIN_SIGMAS binomial standard deviations,
           gives t_hi >= (the k - l-th largest f) >= t_lo, almost always.
  pass     (sequence, kv head, split) programs compute f of every position: those above t_hi are
           taken, those in [t_lo, t_hi] gathered with their f. The row's last program (a ticket
           counter) checks that the bracket held (taken <= needed <= taken + gathered) and picks the
           rest exactly among the gathered ones (kernels.topk.finish_candidates). If it did not
           hold, that program starts over and selects over the whole row alone: exact, slow, rare.

Against a radix select over a written f, this skips writing and re-reading f and two passes of
per-value histograms. Positions come back unordered; exact ties are taken in arrival order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_decode import sequence_extent
from kernels.softmax_stats import merged_softmax_stats
from kernels.topk import _append, finish_candidates
from kernels.tuning import TUNING
from kvcache.table import PageTableCSR

SAMPLES = 4096  # positions per row the bracket scores and sorts
MARGIN_SIGMAS = 4.0  # bracket half-width in binomial standard deviations of the sampled count
FINISH_BLOCK = 8192  # up to this many gathered values the last program selects in registers


@triton.jit
def _score_setup(stat_m_ptr, stat_l_ptr, row, num_stat_splits, G: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_STAT: tl.constexpr):
    """Per query head of the row: the global max of its logits and 1 / (G * sum of exp)."""
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    glob_m, glob_l = merged_softmax_stats(stat_m_ptr, stat_l_ptr, row, num_stat_splits, offs_g, mask_g, G,
                                          BLOCK_STAT)
    return glob_m, tl.where(mask_g & (glob_l > 0), 1.0 / glob_l, 0.0) / G


@triton.jit
def _scores(logits_ptr, row, s_lrow, pos, keep, glob_m, inv_l, G: tl.constexpr, BLOCK_G: tl.constexpr):
    """f at positions pos of the row (0 where not keep)."""
    offs_g = tl.arange(0, BLOCK_G)
    x = tl.load(logits_ptr + (row * G + offs_g)[:, None] * s_lrow + pos[None, :],
                mask=(offs_g < G)[:, None] & keep[None, :], other=float("-inf"))
    return tl.sum(tl.exp(x - glob_m[:, None]) * inv_l[:, None], axis=0)


@triton.jit
def _row_counts(indptr_ptr, last_len_ptr, row, k, local_window, HKV: tl.constexpr, P: tl.constexpr):
    """(positions outside the window, positions, how many to choose outside the window) of a row."""
    _, _, seq_len = sequence_extent(indptr_ptr, last_len_ptr, row // HKV, P)
    return seq_len - local_window, seq_len, k - local_window


@triton.jit
def _bracket_kernel(
    logits_ptr, stat_m_ptr, stat_l_ptr, indptr_ptr, last_len_ptr, bracket_ptr,
    k, local_window, num_stat_splits, s_lrow, margin_sigmas,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr, BLOCK_STAT: tl.constexpr,
    SAMPLES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_valid, _, need = _row_counts(indptr_ptr, last_len_ptr, row, k, local_window, HKV, P)
    glob_m, inv_l = _score_setup(stat_m_ptr, stat_l_ptr, row, num_stat_splits, G, BLOCK_G, BLOCK_STAT)
    offs = tl.arange(0, SAMPLES)
    ns = tl.minimum(n_valid, SAMPLES)
    keep = offs < ns
    pos = (offs.to(tl.int64) * n_valid // tl.maximum(ns, 1)).to(tl.int32)  # every position once ns = n_valid
    f = tl.where(keep, _scores(logits_ptr, row, s_lrow, pos, keep, glob_m, inv_l, G, BLOCK_G), -1.0)
    ranked = tl.sort(f, descending=True)
    expected = need.to(tl.float32) * ns.to(tl.float32) / tl.maximum(n_valid, 1).to(tl.float32)
    margin = margin_sigmas * tl.sqrt(expected) + 2.0
    hi_rank = tl.floor(expected - margin).to(tl.int32)
    lo_rank = tl.ceil(expected + margin).to(tl.int32)
    t_hi = tl.where(hi_rank < 0, float("inf"), tl.sum(tl.where(offs == hi_rank, ranked, 0.0), axis=0))
    t_lo = tl.where(lo_rank >= ns, 0.0, tl.sum(tl.where(offs == lo_rank, ranked, 0.0), axis=0))
    tl.store(bracket_ptr + row * 2, t_lo)
    tl.store(bracket_ptr + row * 2 + 1, t_hi)


@triton.jit
def _append_below(out_row_ptr, counter_ptr, values, keep, limit):
    """_append that drops slots >= limit (a failed bracket may take more than the row holds)."""
    n = tl.sum(keep.to(tl.int32), axis=0)
    if n > 0:
        slot = tl.atomic_add(counter_ptr, n) + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out_row_ptr + slot, values, mask=keep & (slot < limit))


@triton.jit
def _pass_kernel(
    logits_ptr, stat_m_ptr, stat_l_ptr, indptr_ptr, last_len_ptr, bracket_ptr, counters_ptr, out_ptr,
    cand_pos_ptr, cand_val_ptr,
    k, local_window, num_stat_splits, items_per_split, s_lrow, s_out, s_cand,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr, BLOCK_STAT: tl.constexpr,
    BLOCK_N: tl.constexpr, FINISH_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_valid, n_total, need = _row_counts(indptr_ptr, last_len_ptr, row, k, local_window, HKV, P)
    glob_m, inv_l = _score_setup(stat_m_ptr, stat_l_ptr, row, num_stat_splits, G, BLOCK_G, BLOCK_STAT)
    t_lo = tl.load(bracket_ptr + row * 2)
    t_hi = tl.load(bracket_ptr + row * 2 + 1)
    counters = counters_ptr + row * 4
    out_row = out_ptr + row * s_out
    cand_pos = cand_pos_ptr + row * s_cand
    cand_val = cand_val_ptr + row * s_cand
    start = tl.program_id(1) * items_per_split
    end = tl.minimum(start + items_per_split, n_total)
    for it in range(start, end, BLOCK_N):
        offs = it + tl.arange(0, BLOCK_N)
        valid = offs < tl.minimum(end, n_valid)
        f = _scores(logits_ptr, row, s_lrow, offs, valid, glob_m, inv_l, G, BLOCK_G)
        window = (offs >= n_valid) & (offs < end)
        _append_below(out_row, counters + 0, offs, (valid & (f > t_hi)) | window, k)
        band = valid & (f >= t_lo) & (f <= t_hi)
        n = tl.sum(band.to(tl.int32), axis=0)
        if n > 0:
            slot = tl.atomic_add(counters + 1, n) + tl.cumsum(band.to(tl.int32), axis=0) - 1
            tl.store(cand_pos + slot, offs, mask=band)
            tl.store(cand_val + slot, f, mask=band)
    # Every thread's stores are done before the ticket (its atomic is acq_rel): the row's last
    # program then sees all that was taken and gathered.
    tl.debug_barrier()
    if tl.atomic_add(counters + 2, 1) == tl.num_programs(1) - 1:
        above = tl.atomic_add(counters + 0, 0) - (n_total - n_valid)
        gathered = tl.atomic_add(counters + 1, 0)
        if (above <= need) & (need <= above + gathered):
            finish_candidates(cand_pos, cand_val, gathered, need - above, out_row, counters + 0, FINISH_BLOCK)
        else:  # the bracket missed: every position of the row becomes a candidate
            tl.atomic_xchg(counters + 0, 0)
            for it in range(n_valid, n_total, BLOCK_N):
                offs = it + tl.arange(0, BLOCK_N)
                _append(out_row, counters + 0, offs, offs < n_total)
            for it in range(0, n_valid, BLOCK_N):
                offs = it + tl.arange(0, BLOCK_N)
                valid = offs < n_valid
                tl.store(cand_pos + offs, offs, mask=valid)
                tl.store(cand_val + offs, _scores(logits_ptr, row, s_lrow, offs, valid, glob_m, inv_l, G, BLOCK_G),
                         mask=valid)
            tl.debug_barrier()
            finish_candidates(cand_pos, cand_val, n_valid, need, out_row, counters + 0, FINISH_BLOCK)


def sparq_topk(
    logits: torch.Tensor, stat_m: torch.Tensor, stat_l: torch.Tensor, csr: PageTableCSR, num_kv_heads: int,
    k: int, local_window: int, counters: torch.Tensor, block_n: int | None = None, samples: int | None = None,
    margin_sigmas: float = MARGIN_SIGMAS, finish_block: int | None = None,
) -> torch.Tensor:
    """§1 step 4: positions [B*Hkv, k] (int32, unordered): the local window and the k - l largest f.

    logits [B*Hkv, G, S_pad] float32 and stat_m / stat_l [B*Hkv, splits, G] as stage 1 wrote them;
    counters [B*Hkv, 4] int32, zeroed. samples, margin_sigmas and finish_block are for tests; by
    default SAMPLES and FINISH_BLOCK, or the longest row's length rounded up to a power of two if less.
    """
    BH, G, row_len = logits.shape
    dev = logits.device
    longest = triton.next_power_of_2(max(csr.max_len, 16))
    samples = min(SAMPLES, longest) if samples is None else samples
    finish_block = min(FINISH_BLOCK, longest) if finish_block is None else finish_block
    launch = TUNING["scores"]
    block_n = launch.block_n if block_n is None else block_n
    num_stat_splits = stat_m.shape[1]
    bracket = torch.empty((BH, 2), dtype=torch.float32, device=dev)
    out = torch.empty((BH, k), dtype=torch.int32, device=dev)
    cand_pos = torch.empty((BH, row_len), dtype=torch.int32, device=dev)
    cand_val = torch.empty((BH, row_len), dtype=torch.float32, device=dev)
    common = dict(HKV=num_kv_heads, G=G, BLOCK_G=triton.next_power_of_2(G), P=csr.page_size,
                  BLOCK_STAT=triton.next_power_of_2(num_stat_splits))
    _bracket_kernel[(BH,)](
        logits, stat_m, stat_l, csr.indptr, csr.last_page_len, bracket,
        k, local_window, num_stat_splits, logits.stride(1), margin_sigmas,
        SAMPLES=samples, num_warps=8, **common,
    )
    blocks = triton.cdiv(max(csr.max_len, 1), block_n)
    splits = max(1, min(blocks, triton.cdiv(launch.programs, BH)))
    items = triton.cdiv(blocks, splits) * block_n
    _pass_kernel[(BH, triton.cdiv(max(csr.max_len, 1), items))](
        logits, stat_m, stat_l, csr.indptr, csr.last_page_len, bracket, counters, out, cand_pos, cand_val,
        k, local_window, num_stat_splits, items, logits.stride(1), out.stride(0), cand_pos.stride(0),
        BLOCK_N=block_n, FINISH_BLOCK=finish_block, num_warps=launch.num_warps, **common,
    )
    return out
