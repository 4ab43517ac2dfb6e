"""Top-k selection without sorting: a four-level radix select on the bits of non-negative float32 scores.

For scores >= 0 the float32 bit pattern orders like the value, so the k largest are found digit
by digit, 8 bits at a time: bits 30..23 (the exponent), 22..15, 14..7, 6..0 (256 bins or fewer:
tl.histogram's cost grows with the bin count). Each level reads the
histogram of the candidates left by the level above, finds the bin holding the k-th largest,
emits every candidate in a higher bin, and histograms the boundary bin's candidates on the
next digit. Exact ties at the last level are taken in arrival order (any choice among equal
scores is a correct top-k). Positions in [n_valid, n_total) of a row are always taken (SparQ's
local window, ALGORITHMS.md §1 step 4); the rest of the budget goes to the top of [0, n_valid).

Output positions are unordered. One launch per level, each split over (row, chunk) programs;
counters and histograms live in one zeroed int32 workspace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.tuning import TUNING

# (shift, bits) of the radix digits of a non-negative float32, most significant first.
LEVELS = ((23, 8), (15, 8), (7, 8), (0, 7))
_HIST_SIZES = tuple(1 << bits for _, bits in LEVELS)


@triton.jit
def digit_histogram(x, keep, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    """Histogram of digit (bits >> SHIFT) & (NBINS - 1) of x (float32 >= 0) over the lanes where keep."""
    digit = ((x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> SHIFT) & (NBINS - 1)  # -0.0 counts as 0
    hist = tl.histogram(tl.where(keep, digit, 0), NBINS)
    # Dropped lanes were counted in bin 0; take them back out (histogram masks are not in every Triton).
    dropped = tl.sum((keep == 0).to(tl.int32), axis=0)
    return hist - tl.where(tl.arange(0, NBINS) == 0, dropped, 0)


@triton.jit
def _histogram_kernel(
    values_ptr, n_valid_ptr, hist_ptr, items_per_split, s_row,
    BLOCK: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * s_row can pass 2^31
    start = tl.program_id(1) * items_per_split
    end = tl.minimum(start + items_per_split, tl.load(n_valid_ptr + row))
    hist = tl.zeros([NBINS], dtype=tl.int32)
    for it in range(start, end, BLOCK):
        offs = it + tl.arange(0, BLOCK)
        keep = offs < end
        x = tl.load(values_ptr + row * s_row + offs, mask=keep, other=0.0)
        hist += digit_histogram(x, keep, SHIFT, NBINS)
    tl.atomic_add(hist_ptr + row * NBINS + tl.arange(0, NBINS), hist)


@triton.jit
def _select_level_kernel(
    values_ptr, n_valid_ptr, n_total_ptr,
    hist_ptr, next_hist_ptr, state_in_ptr, state_out_ptr, counters_ptr, out_ptr,
    items_per_split, s_row, s_out,
    BLOCK: tl.constexpr, SHIFT: tl.constexpr, NBITS: tl.constexpr,
    NEXT_SHIFT: tl.constexpr, NEXT_NBINS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
):
    NBINS: tl.constexpr = 1 << NBITS
    row = tl.program_id(0).to(tl.int64)  # row * s_row can pass 2^31
    split = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr + row)
    n_total = tl.load(n_total_ptr + row)
    prefix = tl.load(state_in_ptr + row * 2)
    need = tl.load(state_in_ptr + row * 2 + 1)

    # The bin holding the need-th largest candidate, and how many candidates lie above it.
    bins = tl.arange(0, NBINS)
    hist = tl.load(hist_ptr + row * NBINS + bins)
    at_or_above = tl.cumsum(hist, axis=0, reverse=True)
    boundary = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > boundary, hist, 0), axis=0)
    need_next = need - above
    if split == 0:
        tl.store(state_out_ptr + row * 2, (prefix << NBITS) | boundary)
        tl.store(state_out_ptr + row * 2 + 1, need_next)

    start = split * items_per_split
    end = tl.minimum(start + items_per_split, n_total if FIRST else n_valid)
    next_hist = tl.zeros([NEXT_NBINS], dtype=tl.int32)
    for it in range(start, end, BLOCK):
        offs = it + tl.arange(0, BLOCK)
        valid = offs < tl.minimum(end, n_valid)
        x = tl.load(values_ptr + row * s_row + offs, mask=valid, other=0.0)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # -0.0 ranks as 0
        match = valid & ((bits >> (SHIFT + NBITS)) == prefix)  # candidates left by the levels above
        digit = (bits >> SHIFT) & (NBINS - 1)
        take = match & (digit > boundary)
        cand = match & (digit == boundary)
        if FIRST:
            take = take | ((offs >= n_valid) & (offs < end))
        if LAST:
            n_cand = tl.sum(cand.to(tl.int32), axis=0)
            first_tie = tl.atomic_add(counters_ptr + row * 2 + 1, n_cand)
            tie_rank = first_tie + tl.cumsum(cand.to(tl.int32), axis=0) - 1
            take = take | (cand & (tie_rank < need_next))
        else:
            next_hist += digit_histogram(x, cand, NEXT_SHIFT, NEXT_NBINS)
        n_take = tl.sum(take.to(tl.int32), axis=0)
        first = tl.atomic_add(counters_ptr + row * 2, n_take)
        slot = first + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row * s_out + slot, offs, mask=take)
    if not LAST:
        tl.atomic_add(next_hist_ptr + row * NEXT_NBINS + tl.arange(0, NEXT_NBINS), next_hist)


def topk_workspace(rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed int32 buffers for one selection: histograms per level, level states, counters."""
    sizes = {f"hist{i}": n for i, n in enumerate(_HIST_SIZES)}
    sizes.update({f"state{i}": 2 for i in range(len(LEVELS) + 1)})
    sizes["counters"] = 2
    flat = torch.zeros(rows * sum(sizes.values()), dtype=torch.int32, device=device)  # one memset
    views, offset = {}, 0
    for name, size in sizes.items():
        views[name] = flat[offset : offset + rows * size].view(rows, size)
        offset += rows * size
    return views


def radix_topk(
    values: torch.Tensor,
    k: int | torch.Tensor,
    n_valid: torch.Tensor,
    n_total: torch.Tensor | None = None,
    max_total: int | None = None,
    workspace: dict[str, torch.Tensor] | None = None,
    block: int | None = None,
    hist0_done: bool = False,
    k_max: int | None = None,
) -> torch.Tensor:
    """Positions [R, k] (int32, unordered) of the k largest values [R, S] float32 >= 0 in each row.

    Positions in [n_valid[r], n_total[r]) are always taken; the other k - (n_total - n_valid)
    are the largest of values[r, :n_valid[r]]. Needs k <= n_total. `k` may be a per-row int
    tensor [R] (then the output has k_max columns, row r filled up to k[r]). Exact ties at the last
    digit are taken in arrival order, which may differ between runs. With hist0_done the caller
    has already filled workspace['hist0'] (SparQ fuses it into its scoring pass).
    """
    R = values.shape[0]
    n_total = n_valid if n_total is None else n_total
    max_total = values.shape[1] if max_total is None else max_total
    ws = topk_workspace(R, values.device) if workspace is None else workspace
    width = k if isinstance(k, int) else k_max
    out = torch.empty((R, width), dtype=torch.int32, device=values.device)
    ws["state0"][:, 1] = k - (n_total - n_valid)
    launch = TUNING["topk"]
    block = launch.block_n if block is None else block
    blocks = triton.cdiv(max(max_total, 1), block)
    splits = max(1, min(blocks, triton.cdiv(launch.programs, R)))
    items = triton.cdiv(blocks, splits) * block
    splits = triton.cdiv(max(max_total, 1), items)
    grid = (R, splits)
    if not hist0_done:
        shift, bits = LEVELS[0]
        _histogram_kernel[grid](values, n_valid, ws["hist0"], items, values.stride(0),
                                BLOCK=block, SHIFT=shift, NBINS=1 << bits, num_warps=launch.num_warps)
    for level, (shift, bits) in enumerate(LEVELS):
        last = level == len(LEVELS) - 1
        next_shift, next_bits = (0, 1) if last else LEVELS[level + 1]
        _select_level_kernel[grid](
            values, n_valid, n_total,
            ws[f"hist{level}"], ws[f"hist{min(level + 1, len(LEVELS) - 1)}"], ws[f"state{level}"], ws[f"state{level + 1}"],
            ws["counters"], out,
            items, values.stride(0), out.stride(0),
            BLOCK=block, SHIFT=shift, NBITS=bits, NEXT_SHIFT=next_shift, NEXT_NBINS=1 << next_bits,
            FIRST=level == 0, LAST=last, num_warps=launch.num_warps,
        )
    return out
