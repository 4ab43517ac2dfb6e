"""Top-k selection without sorting, on the bits of non-negative float32 scores: a radix select over many
programs for long rows, a bisection in one program's registers for short ones (select_topk picks).

For scores >= 0 the float32 bit pattern orders like the value, so the k largest are found digit
by digit, 8 bits at a time: bits 30..23 (the exponent), 22..15, 14..7, 6..0 (256 bins or fewer:
tl.histogram's cost grows with the bin count). Each digit's histogram of the candidates left by
the digits above gives the bin holding the k-th largest: candidates in higher bins are taken,
those in that bin go on to the next digit. Exact ties at the last digit are taken in arrival
order (any choice among equal scores is a correct top-k). Positions in [n_valid, n_total) of a
row are always taken (SparQ's local window, docs/sparse-attention.md §1 step 4); the rest of the budget
goes to the top of [0, n_valid).

Three launches, each split over (row, chunk) programs, since on a GPU each launch costs more than
the L2-resident pass it makes (4 MB for 8 rows of 128K): the level-0 histogram (skipped when the
caller's scoring pass fills it), digit 0, and digit 1, which also gathers the candidates left
(a handful of positions: they agree with the k-th largest on the top 16 bits) into a list. The
last program of a row to finish digit 1 (a ticket counter) runs digits 2 and 3 over that list,
in registers when it holds at most FINISH_BLOCK. Output positions are unordered. Counters and
histograms live in one int32 workspace, zeroed by a memset or by the caller's first kernel
(zero_workspace_row).

select_topk, what the methods call, runs those launches only for long rows. A row short enough to
sit in one program's registers (or many rows, enough to fill the GPU with one program each: see
ROW_SELECT_MAX) is selected there in one launch, by bisection on the bits (bisect_select), with no
workspace; the caller's scoring pass then skips the level-0 histogram.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_decode import plan_splits
from .pdl import pdl_launch, pdl_trigger, pdl_wait
from .tuning import LARGE_SELECT_ITEMS, TUNING, Launch

# (shift, bits) of the radix digits of a non-negative float32, most significant first.
LEVELS = ((23, 8), (15, 8), (7, 8), (0, 7))
_WORKSPACE = {"hist0": 1 << LEVELS[0][1], "hist1": 1 << LEVELS[1][1], "counters": 4}
# counters of a row: [0] positions emitted, [1] candidates gathered by digit 1, [2] programs done with digit 1.
FINISH_BLOCK = 1024  # candidates the row's last program selects in registers (more: loop steps of this size)
# select_topk gives a row to one program, which selects in registers (bisect_select: one launch, no workspace),
# when rows hold at most ROW_SELECT_MAX items, or at most ROW_SELECT_MAX_MANY and there are ROW_SELECT_MANY_ROWS
# rows or more to spread over the SMs; else the radix levels spread each row over many programs. Gate steps on
# an H200 (budget 4096, bench/results/gate_select_ab_h200.json): 2048 pages x 8 rows 46.2 -> 33.7 us in
# registers; 8192 pages x 64 rows 174.2 -> 143.2 us, but x 8 rows 46.8 -> 48.3 us.
ROW_SELECT_MAX = 2048
ROW_SELECT_MAX_MANY = 8192
ROW_SELECT_MANY_ROWS = 16


@triton.jit
def _digit(x, SHIFT: tl.constexpr, NBITS: tl.constexpr):
    return ((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> SHIFT) & ((1 << NBITS) - 1)


@triton.jit
def _boundary(hist, need, NBINS: tl.constexpr):
    """(the bin holding the need-th largest candidate, the need left inside it) of a histogram."""
    bins = tl.arange(0, NBINS)
    at_or_above = tl.cumsum(hist, axis=0, reverse=True)
    boundary = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
    return boundary, need - tl.sum(tl.where(bins > boundary, hist, 0), axis=0)


@triton.jit
def radix_level(x, cand, taken, need, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """One digit of an in-register select: take the candidates above the boundary bin, keep those in it."""
    boundary, need = _boundary(digit_histogram(x, cand, SHIFT, NBINS), need, NBINS)
    digit = ((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> SHIFT) & (NBINS - 1)
    taken = taken | (cand & (digit > boundary))
    cand = cand & (digit == boundary)
    return cand, taken, need


@triton.jit
def bisect_select(x, cand, need):
    """(taken, ties, need left) of an in-register top-`need` of the candidate lanes of x (float32 >= 0).

    Bisection on the float bits (they order like the values): the largest t with at least `need`
    candidates at or above it, 31 halvings of [0, +inf]. Lanes above t are taken; `need left` of the
    lanes equal to t (the ties) complete the choice. One block reduction per halving, where a radix
    digit costs a tl.histogram whose time grows with its bins: at 8192 lanes on an H200 this took
    20 us against 29 us for four 8-bit digits (16 warps). Fewer, wider steps (3 pivots a step, their
    counts packed in one int64 sum) were no faster: the time goes with the lanes, not the reductions."""
    bits = tl.where(cand, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)  # -0.0 ranks as 0
    lo = tl.zeros([], dtype=tl.int32)  # count(bits >= lo) >= need, while count(bits >= hi) < need
    hi = tl.full([], 0x7F800001, dtype=tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= need
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    taken = bits > lo
    return taken, bits == lo, need - tl.sum(taken.to(tl.int32), axis=0)


@triton.jit
def digit_histogram(x, keep, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """Histogram of digit (bits >> SHIFT) & (NBINS - 1) of x (float32 >= 0) over the lanes where keep."""
    digit = ((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> SHIFT) & (NBINS - 1)  # -0.0 counts as 0
    hist = tl.histogram(tl.where(keep, digit, 0), NBINS)
    # Dropped lanes were counted in bin 0; take them back out (histogram masks are not in every Triton).
    dropped = tl.sum((keep == 0).to(tl.int32), axis=0)
    return hist - tl.where(tl.arange(0, NBINS) == 0, dropped, 0)


@triton.jit
def add_histogram(hist_ptr, hist, NBINS: tl.constexpr):
    """Add a program's histogram into a row's in memory: only its nonzero bins, relaxed atomics.

    A pass ends with one such add per program (about a thousand programs per row at 128K), and the
    values of a digit fall in a few bins: a full 256-bin add with the default acq_rel ordering costs
    256 fenced atomics a program, most of them adding zero. The reader runs in a later launch, so
    no ordering is needed."""
    tl.atomic_add(hist_ptr + tl.arange(0, NBINS), hist, mask=hist != 0, sem="relaxed")


@triton.jit
def _append(out_row_ptr, counter_ptr, values, keep):
    """Write values where keep at the next free slots of a row (slots taken with one atomic)."""
    n = tl.sum(keep.to(tl.int32), axis=0)
    if n > 0:
        first = tl.atomic_add(counter_ptr, n)
        slot = first + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(out_row_ptr + slot, values, mask=keep)


@triton.jit
def zero_workspace_row(hist0_ptr, hist1_ptr, counters_ptr, row, B0: tl.constexpr, B1: tl.constexpr):
    """Zero one row of a topk_workspace(zeroed=False) from inside a kernel that runs before the select
    (B0, B1: the bits of LEVELS' first two digits)."""
    tl.store(hist0_ptr + row * (1 << B0) + tl.arange(0, 1 << B0), tl.zeros([1 << B0], dtype=tl.int32))
    tl.store(hist1_ptr + row * (1 << B1) + tl.arange(0, 1 << B1), tl.zeros([1 << B1], dtype=tl.int32))
    tl.store(counters_ptr + row * 4 + tl.arange(0, 4), tl.zeros([4], dtype=tl.int32))


@triton.jit
def _row_counts(n_valid_ptr, n_total_ptr, k_ptr, k, K_PER_ROW: tl.constexpr):
    """(row, n_valid, n_total, positions to choose from [0, n_valid)) of the program's row (program_id 0)."""
    row = tl.program_id(0).to(tl.int64)
    n_valid = tl.load(n_valid_ptr + row)
    n_total = tl.load(n_total_ptr + row)
    return row, n_valid, n_total, _need0(k_ptr, k, row, n_valid, n_total, K_PER_ROW)


@triton.jit
def _need0(k_ptr, k, row, n_valid, n_total, K_PER_ROW: tl.constexpr):
    """Positions to choose from [0, n_valid): the budget less the forced tail."""
    if K_PER_ROW:
        k = tl.load(k_ptr + row)
    return k - (n_total - n_valid)


@triton.jit
def _histogram_kernel(
    values_ptr, n_valid_ptr, hist_ptr, items_per_split, s_row,
    BLOCK: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)  # row * s_row can pass 2^31
    start = tl.program_id(1) * items_per_split
    end = tl.minimum(start + items_per_split, tl.load(n_valid_ptr + row))
    hist = tl.zeros([NBINS], dtype=tl.int32)
    for it in range(start, end, BLOCK):
        offs = it + tl.arange(0, BLOCK)
        keep = offs < end
        x = tl.load(values_ptr + row * s_row + offs, mask=keep, other=0.0)
        hist += digit_histogram(x, keep, SHIFT, NBINS)
    add_histogram(hist_ptr + row * NBINS, hist, NBINS)


@triton.jit
def _digit0_kernel(
    values_ptr, n_valid_ptr, n_total_ptr, k_ptr, hist0_ptr, hist1_ptr, counters_ptr, out_ptr,
    k, items_per_split, s_row, s_out,
    BLOCK: tl.constexpr, K_PER_ROW: tl.constexpr,
    S0: tl.constexpr, B0: tl.constexpr, S1: tl.constexpr, B1: tl.constexpr, PDL: tl.constexpr,
):
    """Take the tail and every value above digit 0's boundary bin; histogram digit 1 of those in it."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row, n_valid, n_total, need = _row_counts(n_valid_ptr, n_total_ptr, k_ptr, k, K_PER_ROW)
    b0, _ = _boundary(tl.load(hist0_ptr + row * (1 << B0) + tl.arange(0, 1 << B0)), need, 1 << B0)
    start = tl.program_id(1) * items_per_split
    end = tl.minimum(start + items_per_split, n_total)
    hist1 = tl.zeros([1 << B1], dtype=tl.int32)
    for it in range(start, end, BLOCK):
        offs = it + tl.arange(0, BLOCK)
        valid = offs < tl.minimum(end, n_valid)
        x = tl.load(values_ptr + row * s_row + offs, mask=valid, other=0.0)
        d0 = _digit(x, S0, B0)
        take = (valid & (d0 > b0)) | ((offs >= n_valid) & (offs < end))
        hist1 += digit_histogram(x, valid & (d0 == b0), S1, 1 << B1)
        _append(out_ptr + row * s_out, counters_ptr + row * 4 + 0, offs, take)
    add_histogram(hist1_ptr + row * (1 << B1), hist1, 1 << B1)


@triton.jit
def _digit1_kernel(
    values_ptr, n_valid_ptr, n_total_ptr, k_ptr, hist0_ptr, hist1_ptr, counters_ptr, out_ptr,
    cand_pos_ptr, cand_val_ptr,
    k, items_per_split, s_row, s_out, s_cand,
    BLOCK: tl.constexpr, FINISH_BLOCK: tl.constexpr, K_PER_ROW: tl.constexpr,
    S0: tl.constexpr, B0: tl.constexpr, S1: tl.constexpr, B1: tl.constexpr,
    S2: tl.constexpr, B2: tl.constexpr, S3: tl.constexpr, B3: tl.constexpr, PDL: tl.constexpr,
):
    """Take the values above digit 1's boundary bin, gather those in it (position and value); the
    row's last program then runs digits 2 and 3 over the gathered list."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row, n_valid, _, need = _row_counts(n_valid_ptr, n_total_ptr, k_ptr, k, K_PER_ROW)
    b0, need = _boundary(tl.load(hist0_ptr + row * (1 << B0) + tl.arange(0, 1 << B0)), need, 1 << B0)
    b1, need = _boundary(tl.load(hist1_ptr + row * (1 << B1) + tl.arange(0, 1 << B1)), need, 1 << B1)
    counters = counters_ptr + row * 4
    out_row = out_ptr + row * s_out
    cand_pos = cand_pos_ptr + row * s_cand
    cand_val = cand_val_ptr + row * s_cand
    start = tl.program_id(1) * items_per_split
    end = tl.minimum(start + items_per_split, n_valid)
    for it in range(start, end, BLOCK):
        offs = it + tl.arange(0, BLOCK)
        valid = offs < end
        x = tl.load(values_ptr + row * s_row + offs, mask=valid, other=0.0)
        match = valid & (_digit(x, S0, B0) == b0)
        d1 = _digit(x, S1, B1)
        _append(out_row, counters + 0, offs, match & (d1 > b1))
        cand = match & (d1 == b1)
        n = tl.sum(cand.to(tl.int32), axis=0)
        if n > 0:
            slot = tl.atomic_add(counters + 1, n) + tl.cumsum(cand.to(tl.int32), axis=0) - 1
            tl.store(cand_pos + slot, offs, mask=cand)
            tl.store(cand_val + slot, x, mask=cand)
    # Every thread's stores are done before the ticket (its atomic is acq_rel): the last program of
    # the row then sees all the gathered candidates. They are few (they share the k-th largest's top
    # 16 bits), so their digit-2 histogram is made here rather than by every program.
    tl.debug_barrier()
    if tl.atomic_add(counters + 2, 1) == tl.num_programs(1) - 1:
        n_cand = tl.atomic_add(counters + 1, 0)
        if n_cand <= FINISH_BLOCK:  # the usual case: one load, both digits in registers
            offs_c = tl.arange(0, FINISH_BLOCK)
            cand = offs_c < n_cand
            pos = tl.load(cand_pos + offs_c, mask=cand, other=0, volatile=True)
            x = tl.load(cand_val + offs_c, mask=cand, other=0.0, volatile=True)
            taken = offs_c < 0
            cand, taken, need = radix_level(x, cand, taken, need, S2, 1 << B2)
            cand, taken, need = radix_level(x, cand, taken, need, S3, 1 << B3)
            tie_rank = tl.cumsum(cand.to(tl.int32), axis=0)  # exact ties: the first ones
            _append(out_row, counters + 0, pos, taken | (cand & (tie_rank <= need)))
        else:  # many values tied on the top 16 bits: digit by digit over memory
            hist2 = tl.zeros([1 << B2], dtype=tl.int32)
            for c0 in range(0, n_cand, FINISH_BLOCK):
                offs_c = c0 + tl.arange(0, FINISH_BLOCK)
                live = offs_c < n_cand
                hist2 += digit_histogram(tl.load(cand_val + offs_c, mask=live, other=0.0, volatile=True), live,
                                         S2, 1 << B2)
            b2, need = _boundary(hist2, need, 1 << B2)
            hist3 = tl.zeros([1 << B3], dtype=tl.int32)
            for c0 in range(0, n_cand, FINISH_BLOCK):
                offs_c = c0 + tl.arange(0, FINISH_BLOCK)
                live = offs_c < n_cand
                pos = tl.load(cand_pos + offs_c, mask=live, other=0, volatile=True)
                x = tl.load(cand_val + offs_c, mask=live, other=0.0, volatile=True)
                d2 = _digit(x, S2, B2)
                hist3 += digit_histogram(x, live & (d2 == b2), S3, 1 << B3)
                _append(out_row, counters + 0, pos, live & (d2 > b2))
            b3, need = _boundary(hist3, need, 1 << B3)
            ties_before = 0
            for c0 in range(0, n_cand, FINISH_BLOCK):
                offs_c = c0 + tl.arange(0, FINISH_BLOCK)
                live = offs_c < n_cand
                pos = tl.load(cand_pos + offs_c, mask=live, other=0, volatile=True)
                x = tl.load(cand_val + offs_c, mask=live, other=0.0, volatile=True)
                same = live & (_digit(x, S2, B2) == b2)
                d3 = _digit(x, S3, B3)
                tie = same & (d3 == b3)
                tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), axis=0) - 1  # exact ties: the first ones
                ties_before += tl.sum(tie.to(tl.int32), axis=0)
                _append(out_row, counters + 0, pos, (same & (d3 > b3)) | (tie & (tie_rank < need)))


@triton.jit
def _row_select_kernel(
    values_ptr, n_valid_ptr, n_total_ptr, k_ptr, out_ptr, k, s_row, s_out,
    BLOCK: tl.constexpr, K_PER_ROW: tl.constexpr, PDL: tl.constexpr,
):
    """One program per row, all its values in registers: the tail, the top of [0, n_valid) by bisection, exact
    ties in position order. Positions come out in increasing order."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row, n_valid, n_total, need = _row_counts(n_valid_ptr, n_total_ptr, k_ptr, k, K_PER_ROW)
    offs = tl.arange(0, BLOCK)
    cand = offs < n_valid
    x = tl.load(values_ptr + row * s_row + offs, mask=cand, other=0.0)
    taken, ties, need = bisect_select(x, cand, need)
    tie_rank = tl.cumsum(ties.to(tl.int32), axis=0)
    taken = taken | ((offs >= n_valid) & (offs < n_total)) | (ties & (tie_rank <= need))
    slot = tl.cumsum(taken.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * s_out + slot, offs, mask=taken)


def selects_in_registers(width: int, rows: int) -> bool:
    """Whether select_topk gives each of `rows` rows of `width` items to one program (see ROW_SELECT_MAX)."""
    return width <= ROW_SELECT_MAX or (rows >= ROW_SELECT_MANY_ROWS and width <= ROW_SELECT_MAX_MANY)


def topk_workspace(rows: int, device: torch.device, zeroed: bool = True) -> dict[str, torch.Tensor]:
    """int32 buffers for one selection: the histograms of digits 0 and 1 and the counters of each row,
    zeroed (one memset) unless the caller's first kernel zeroes them (see zero_workspace_row)."""
    alloc = torch.zeros if zeroed else torch.empty
    flat = alloc(rows * sum(_WORKSPACE.values()), dtype=torch.int32, device=device)
    views, offset = {}, 0
    for name, size in _WORKSPACE.items():
        views[name] = flat[offset : offset + rows * size].view(rows, size)
        offset += rows * size
    return views


def select_topk(
    values: torch.Tensor,
    k: int | torch.Tensor,
    n_valid: torch.Tensor,
    n_total: torch.Tensor | None = None,
    max_total: int | None = None,
    workspace: dict[str, torch.Tensor] | None = None,
    block: int | None = None,
    hist0_done: bool = False,
    k_max: int | None = None,
    launch: Launch | None = None,
    pdl: bool = False,
    in_registers: bool | None = None,
) -> torch.Tensor:
    """Positions [R, k] (int32, unordered) of the k largest values [R, S] float32 >= 0 in each row.

    Positions in [n_valid[r], n_total[r]) are always taken; the other k - (n_total - n_valid)
    are the largest of values[r, :n_valid[r]]. Needs k <= n_total. `k` may be a per-row int
    tensor [R] (then the output has k_max columns, row r filled up to k[r]). Exact ties are taken in
    position order in registers, in arrival order (which may differ between runs) by the radix levels.

    `in_registers` picks one program per row (default: selects_in_registers(max_total, R)), else the radix
    levels: with hist0_done the caller has already filled workspace['hist0'] (SparQ fuses it into its
    scoring pass), and `block` / `launch` override TUNING['topk'] (TUNING['topk_large'] from R x max_total >=
    LARGE_SELECT_ITEMS). With `pdl` (kvcache.kernels.pdl) each launch follows the kernel before it, the first the
    caller's.
    """
    R = values.shape[0]
    n_total = n_valid if n_total is None else n_total
    max_total = values.shape[1] if max_total is None else max_total
    per_row = not isinstance(k, int)
    out = torch.empty((R, k_max if per_row else k), dtype=torch.int32, device=values.device)
    k_ptr, k_int = (k, 0) if per_row else (n_valid, k)
    if in_registers is None:
        in_registers = selects_in_registers(max_total, R)
    if in_registers:
        width = triton.next_power_of_2(max(max_total, 1))
        # 8 warps at 8192 items: 19.6 us against 20.9 with 16 (a lone launch, 8 rows; H100 and H200 alike).
        _row_select_kernel[(R,)](values, n_valid, n_total, k_ptr, out, k_int, values.stride(0), out.stride(0),
                                 BLOCK=width, K_PER_ROW=per_row, PDL=pdl, num_warps=max(4, min(8, width // 512)),
                                 **pdl_launch(pdl))
        return out
    ws = topk_workspace(R, values.device) if workspace is None else workspace
    cand_pos = torch.empty((R, max(max_total, 1)), dtype=torch.int32, device=values.device)
    cand_val = torch.empty((R, max(max_total, 1)), dtype=torch.float32, device=values.device)
    if launch is None:
        launch = TUNING["topk_large" if R * max_total >= LARGE_SELECT_ITEMS else "topk"]
    block = launch.block_n if block is None else block
    splits, items = plan_splits(max_total, R, block, launch.programs)
    grid = (R, splits)
    (s0, b0), (s1, b1), (s2, b2), (s3, b3) = LEVELS
    if not hist0_done:
        _histogram_kernel[grid](values, n_valid, ws["hist0"], items, values.stride(0),
                                BLOCK=block, SHIFT=s0, NBINS=1 << b0, PDL=pdl, num_warps=launch.num_warps,
                                **pdl_launch(pdl))
    _digit0_kernel[grid](
        values, n_valid, n_total, k_ptr, ws["hist0"], ws["hist1"], ws["counters"], out,
        k_int, items, values.stride(0), out.stride(0),
        BLOCK=block, K_PER_ROW=per_row, S0=s0, B0=b0, S1=s1, B1=b1, PDL=pdl, num_warps=launch.num_warps,
        **pdl_launch(pdl),
    )
    _digit1_kernel[grid](
        values, n_valid, n_total, k_ptr, ws["hist0"], ws["hist1"], ws["counters"], out, cand_pos, cand_val,
        k_int, items, values.stride(0), out.stride(0), cand_pos.stride(0),
        BLOCK=block, FINISH_BLOCK=FINISH_BLOCK, K_PER_ROW=per_row,
        S0=s0, B0=b0, S1=s1, B1=b1, S2=s2, B2=b2, S3=s3, B3=b3, PDL=pdl, num_warps=launch.num_warps,
        **pdl_launch(pdl),
    )
    return out
