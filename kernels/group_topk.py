"""SparQ's selection in one launch: the group's scores and their top-k, each row spread over programs that wait for
one another at four in-kernel barriers (docs/sparse-attention.md §1 step 4).

The scoring pass and the radix select of kvcache.kernels.group_scores and kvcache.kernels.topk take three launches
at 128K positions, the last program of each row finishing the select alone; on an H100 about 40 us of the step's
120 us, where their bytes take a few. Here the C programs of a row (C = the SMs over the rows, so all programs are
resident at once and a program waiting at a barrier never waits on one that cannot start) do, in phases:

  0  f = mean_g softmax(x_g) of their slice from stage 1's logits and split statistics, written to f (L2-sized),
     and the histogram of its digit 0;
  1-3  the histogram of digit 1, 2, 3 over the values that match the boundary bins found so far;
  4  the positions above the threshold found (the k-th largest), the exact ties in arrival order, and the forced
     tail (the local window).

Between phases each program adds its histogram to the row's with relaxed atomics and meets the row's other
programs at a barrier (a counter in the workspace that stage 1 zeroed). Under the Triton interpreter programs
run one after another, so a barrier would never open: there the phases run as five launches (the same code, the
barriers left out), which is also how the GPU test checks the one-launch path against them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .csr import PageTableCSR
from .paged_decode import sequence_extent
from .softmax_stats import merged_softmax_stats
from .topk import LEVELS, _append, _boundary, _digit, add_histogram, digit_histogram

ALL_PHASES = -1
PROGRAMS_PER_ROW_MAX = 32  # a row's programs: more split the slices finer, but add barrier arrivals
BLOCK = 1024  # values per loop step
NUM_WARPS = 8


@triton.jit
def _row_barrier(counter_ptr, target):
    """Wait until `target` arrivals at the row's counter, this program's included (one arrival per program)."""
    tl.debug_barrier()  # every thread's histogram atomics are issued before the arrival releases them
    tl.atomic_add(counter_ptr, 1, sem="release")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _thresholds(hist0, hist, need0, LEVEL: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):
    """Boundary bins of digits 0..LEVEL-1 (LEVEL >= 1) from the row's histograms (digit 0's at hist0, digits 1-3's at
    hist, 256 apart), and the count still needed inside them. Volatile loads: other SMs wrote them this launch."""
    b1 = 0
    b2 = 0
    b0, need = _boundary(tl.load(hist0 + tl.arange(0, 1 << B0), volatile=True), need0, 1 << B0)
    if LEVEL > 1:
        b1, need = _boundary(tl.load(hist + tl.arange(0, 1 << B1), volatile=True), need, 1 << B1)
    if LEVEL > 2:
        b2, need = _boundary(tl.load(hist + 256 + tl.arange(0, 1 << B2), volatile=True), need, 1 << B2)
    return b0, b1, b2, need


@triton.jit
def _match_histogram(f_row, start, end, hist0, hist, need0, LEVEL: tl.constexpr, BLOCK_N: tl.constexpr,
                     S0: tl.constexpr, B0: tl.constexpr, S1: tl.constexpr, B1: tl.constexpr,
                     S2: tl.constexpr, B2: tl.constexpr, S3: tl.constexpr, B3: tl.constexpr):
    """Phase LEVEL (1-3): add the histogram of digit LEVEL over the slice's values that match the boundary bins of
    the digits above it to the row's."""
    b0, b1, b2, _ = _thresholds(hist0, hist, need0, LEVEL, B0, B1, B2)
    if LEVEL == 1:
        SHIFT: tl.constexpr = S1
        NB: tl.constexpr = 1 << B1
    elif LEVEL == 2:
        SHIFT: tl.constexpr = S2
        NB: tl.constexpr = 1 << B2
    else:
        SHIFT: tl.constexpr = S3
        NB: tl.constexpr = 1 << B3
    h = tl.zeros([NB], dtype=tl.int32)
    for it in range(start, end, BLOCK_N):
        offs = it + tl.arange(0, BLOCK_N)
        keep = offs < end
        x = tl.load(f_row + offs, mask=keep, other=0.0)
        match = keep & (_digit(x, S0, B0) == b0)
        if LEVEL > 1:
            match = match & (_digit(x, S1, B1) == b1)
        if LEVEL > 2:
            match = match & (_digit(x, S2, B2) == b2)
        h += digit_histogram(x, match, SHIFT, NB)
    add_histogram(hist + (LEVEL - 1) * 256, h, NB)


@triton.jit
def _group_topk_kernel(
    logits_ptr, stat_m_ptr, stat_l_ptr, indptr_ptr, last_len_ptr,
    f_ptr, hist0_ptr, hist_ptr, counters_ptr, out_ptr,
    k, tail, items_per_program, num_stat_splits, s_lbh, s_lg, s_ln, s_frow, s_out,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr, BLOCK_STAT: tl.constexpr,
    BLOCK_N: tl.constexpr, PHASE: tl.constexpr,
    S0: tl.constexpr, B0: tl.constexpr, S1: tl.constexpr, B1: tl.constexpr,
    S2: tl.constexpr, B2: tl.constexpr, S3: tl.constexpr, B3: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    C = tl.num_programs(1)
    b = row // HKV
    _, _, n_total = sequence_extent(indptr_ptr, last_len_ptr, b, P)
    n_valid = tl.maximum(n_total - tail, 0)
    need0 = k - (n_total - n_valid)
    start = c * items_per_program
    end = tl.minimum(start + items_per_program, n_valid)
    hist0 = hist0_ptr + row * (1 << B0)
    hist = hist_ptr + row * 768  # digits 1, 2, 3
    counters = counters_ptr + row * 4
    f_row = f_ptr + row * s_frow

    if PHASE < 0 or PHASE == 0:
        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < G
        glob_m, glob_l = merged_softmax_stats(stat_m_ptr, stat_l_ptr, row, num_stat_splits, offs_g, mask_g,
                                              G, BLOCK_STAT)
        has = mask_g & (glob_l > 0)  # padded heads and empty rows weigh 0
        inv_l = tl.where(has, 1.0 / tl.where(has, glob_l, 1.0), 0.0) / G
        h0 = tl.zeros([1 << B0], dtype=tl.int32)
        for it in range(start, end, BLOCK_N):
            offs = it + tl.arange(0, BLOCK_N)
            keep = offs < end
            x = tl.load(logits_ptr + row * s_lbh + offs_g[:, None] * s_lg + offs[None, :] * s_ln,
                        mask=mask_g[:, None] & keep[None, :], other=float("-inf"))
            f = tl.sum(tl.exp(x - glob_m[:, None]) * inv_l[:, None], axis=0)
            tl.store(f_row + offs, f, mask=keep)
            h0 += digit_histogram(f, keep, S0, 1 << B0)
        add_histogram(hist0, h0, 1 << B0)
        if c == 0:  # digits 1-3: first added to after this phase's barrier
            tl.store(hist + tl.arange(0, 256), tl.zeros([256], dtype=tl.int32))
            tl.store(hist + 256 + tl.arange(0, 512), tl.zeros([512], dtype=tl.int32))
    if PHASE < 0:
        _row_barrier(counters + 2, C)

    for level in tl.static_range(1, 4):
        if PHASE < 0 or PHASE == level:
            _match_histogram(f_row, start, end, hist0, hist, need0, level, BLOCK_N, S0, B0, S1, B1, S2, B2, S3, B3)
        if PHASE < 0:
            _row_barrier(counters + 2, C * (level + 1))

    if PHASE < 0 or PHASE == 4:
        b0, b1, b2, need = _thresholds(hist0, hist, need0, 3, B0, B1, B2)
        b3, need = _boundary(tl.load(hist + 512 + tl.arange(0, 1 << B3), volatile=True), need, 1 << B3)
        out_row = out_ptr + row * s_out
        for it in range(start, end, BLOCK_N):
            offs = it + tl.arange(0, BLOCK_N)
            keep = offs < end
            x = tl.load(f_row + offs, mask=keep, other=0.0)
            d0 = _digit(x, S0, B0)
            d1 = _digit(x, S1, B1)
            d2 = _digit(x, S2, B2)
            d3 = _digit(x, S3, B3)
            e0 = d0 == b0
            e1 = e0 & (d1 == b1)
            e2 = e1 & (d2 == b2)
            above = (d0 > b0) | (e0 & (d1 > b1)) | (e1 & (d2 > b2)) | (e2 & (d3 > b3))
            tie = keep & e2 & (d3 == b3)
            n_tie = tl.sum(tie.to(tl.int32), axis=0)
            first = 0
            if n_tie > 0:  # exact ties: the first `need` to arrive are taken
                first = tl.atomic_add(counters + 1, n_tie)
            rank = first + tl.cumsum(tie.to(tl.int32), axis=0) - 1
            _append(out_row, counters + 0, offs, (keep & above) | (tie & (rank < need)))
        if c == 0:  # the forced tail
            for it in range(n_valid, n_total, BLOCK_N):
                offs = it + tl.arange(0, BLOCK_N)
                _append(out_row, counters + 0, offs, offs < n_total)


def programs_per_row(rows: int, device: torch.device) -> int:
    """A row's programs: on a GPU all of the launch's programs resident at once (at most one per SM), at most
    PROGRAMS_PER_ROW_MAX, and one program per row needs no resident peers; on the CPU (phased launches) 4, so the
    tests see rows split over programs."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(PROGRAMS_PER_ROW_MAX, sms // max(rows, 1)))


def group_topk(
    logits: torch.Tensor, stat_m: torch.Tensor, stat_l: torch.Tensor, csr: PageTableCSR, num_kv_heads: int,
    k: int, tail: int, workspace: dict[str, torch.Tensor], phased: bool | None = None,
) -> torch.Tensor:
    """Positions [B*Hkv, k] int32 (unordered): the last `tail` positions of each row and the k - tail largest
    f = mean_g softmax(x_g) of the others, from logits [B*Hkv, G, S_pad] (any strides) and stage 1's split stats
    stat_m / stat_l [B*Hkv, splits, G]. The workspace is kvcache.kernels.topk's, zeroed (stage 1 does it): digit 0's
    histogram and the counters come from it.

    `phased` runs the five phases as five launches (default: on the CPU, where the Triton interpreter runs
    programs one at a time); otherwise one launch with in-kernel barriers."""
    BH, G, row_len = logits.shape
    dev = logits.device
    phased = dev.type != "cuda" if phased is None else phased
    C = programs_per_row(BH, dev)
    items = triton.cdiv(triton.cdiv(max(csr.max_len, 1), C), BLOCK) * BLOCK
    f = torch.empty((BH, row_len), dtype=torch.float32, device=dev)
    hist = torch.empty((BH, 768), dtype=torch.int32, device=dev)  # digits 1-3, zeroed in phase 0
    out = torch.empty((BH, k), dtype=torch.int32, device=dev)
    num_splits = stat_m.shape[1]
    (s0, b0), (s1, b1), (s2, b2), (s3, b3) = LEVELS
    for phase in (range(5) if phased else (ALL_PHASES,)):
        _group_topk_kernel[(BH, C)](
            logits, stat_m, stat_l, csr.indptr, csr.last_page_len,
            f, workspace["hist0"], hist, workspace["counters"], out,
            k, tail, items, num_splits, *logits.stride(), f.stride(0), out.stride(0),
            HKV=num_kv_heads, G=G, BLOCK_G=triton.next_power_of_2(G), P=csr.page_size,
            BLOCK_STAT=triton.next_power_of_2(num_splits), BLOCK_N=BLOCK, PHASE=phase,
            S0=s0, B0=b0, S1=s1, B1=b1, S2=s2, B2=b2, S3=s3, B3=b3, num_warps=NUM_WARPS,
        )
    return out
