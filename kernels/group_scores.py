"""A GQA group's selection scores from per-head logits: f = mean_g softmax(x_g), and the top-k's first histogram.

Both SparQ (approximate logits per position, docs/sparse-attention.md §1 step 4) and Quest (bound logits per
page, §5) rank a row's items by the group mean of each head's softmax. The kernel that wrote the
logits also wrote per-split softmax stats (max, sum of exp) per head, so one pass over the logits
gives f = sum_g exp(x_g - m_g) / (G l_g), writes it, and fills kvcache.kernels.topk's level-0 histogram
over the items outside the row's forced tail (SparQ's local window, Quest's last page): one
launch where torch takes a softmax, a sum and a histogram of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .csr import PageTableCSR
from .paged_decode import sequence_extent
from .softmax_stats import merged_softmax_stats
from .topk import LEVELS, add_histogram, digit_histogram
from .tuning import TUNING


@triton.jit
def _group_scores_kernel(
    logits_ptr, stat_m_ptr, stat_l_ptr, indptr_ptr, last_len_ptr,
    f_ptr, n_valid_ptr, n_total_ptr, k_ptr, hist_ptr,
    tail, k_cap, items_per_split, num_stat_splits, s_lbh, s_lg, s_ln, s_frow,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, P: tl.constexpr, PAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_STAT: tl.constexpr, SHIFT: tl.constexpr, NBINS: tl.constexpr,
    WITH_HIST: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // HKV
    if PAGES:
        n_total = tl.load(indptr_ptr + b + 1) - tl.load(indptr_ptr + b)
    else:
        _, _, n_total = sequence_extent(indptr_ptr, last_len_ptr, b, P)
    n_valid = tl.maximum(n_total - tail, 0)
    if split == 0:
        tl.store(n_valid_ptr + pid_bh, n_valid)
        tl.store(n_total_ptr + pid_bh, n_total)
        if PAGES:  # items to read: all of a short row, else the cap
            tl.store(k_ptr + pid_bh, tl.minimum(n_total, k_cap))

    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    glob_m, glob_l = merged_softmax_stats(stat_m_ptr, stat_l_ptr, pid_bh, num_stat_splits, offs_g, mask_g,
                                          G, BLOCK_STAT)
    has = mask_g & (glob_l > 0)  # padded heads and empty rows weigh 0
    inv_l = tl.where(has, 1.0 / tl.where(has, glob_l, 1.0), 0.0) / G

    hist = tl.zeros([NBINS], dtype=tl.int32)
    start = split * items_per_split
    end = tl.minimum(start + items_per_split, n_valid)
    for it in range(start, end, BLOCK_N):
        offs_n = it + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # One [BLOCK_N] load per head rather than one [G, BLOCK_N] tile: on SparQ's position-major logits the tile
        # made this pass 2.4x slower (H100, 128K x 8: 219.7 against 99.0 us; head-major tiles: 89.1 us;
        # bench/results/sparq_scores_loads_ab_h100.json).
        f = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in tl.static_range(G):
            m_g = tl.sum(tl.where(offs_g == g, glob_m, 0.0), axis=0)
            inv_l_g = tl.sum(tl.where(offs_g == g, inv_l, 0.0), axis=0)
            x = tl.load(logits_ptr + pid_bh * s_lbh + g * s_lg + offs_n * s_ln, mask=mask_n, other=float("-inf"))
            f += tl.exp(x - m_g) * inv_l_g
        tl.store(f_ptr + pid_bh * s_frow + offs_n, f, mask=mask_n)
        if WITH_HIST:
            hist += digit_histogram(f, mask_n, SHIFT, NBINS)
    if WITH_HIST:
        add_histogram(hist_ptr + pid_bh * NBINS, hist, NBINS)


def group_scores(
    logits: torch.Tensor, stat_m: torch.Tensor, stat_l: torch.Tensor, items_per_split: int, csr: PageTableCSR,
    num_kv_heads: int, tail: int, hist0: torch.Tensor, pages: bool = False, k_cap: int = 0,
    block_n: int | None = None, with_hist: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores f [B*Hkv, S_pad] float32 and per-row int32 counts {n_valid, n_total (, k)} of each row's items.

    logits [B*Hkv, G, S_pad] (any strides) and stat_m / stat_l [B*Hkv, splits, G] come from a kernel that split each
    row into splits of items_per_split items. Items are positions, or pages when `pages` (then 'k' =
    min(pages, k_cap) is written too). The last `tail` items of a row are left out of the histogram
    (hist0 [B*Hkv, 256] int32, zeroed: kvcache.kernels.topk's level 0, filled by atomics); without `with_hist`, for a
    select in registers, hist0 is not touched.
    """
    BH, G, row_len = logits.shape
    dev = logits.device
    launch = TUNING["page_scores" if pages else "scores"]
    block_n = launch.block_n if block_n is None else block_n
    num_splits = stat_m.shape[1]
    f = torch.empty((BH, row_len), dtype=torch.float32, device=dev)
    names = ("n_valid", "n_total", "k") if pages else ("n_valid", "n_total")
    counts = {name: torch.empty(BH, dtype=torch.int32, device=dev) for name in names}
    shift, bits = LEVELS[0]
    _group_scores_kernel[(BH, num_splits)](
        logits, stat_m, stat_l, csr.indptr, csr.last_page_len,
        f, counts["n_valid"], counts["n_total"], counts.get("k", counts["n_valid"]), hist0,
        tail, k_cap, items_per_split, num_splits, *logits.stride(), f.stride(0),
        HKV=num_kv_heads, G=G, BLOCK_G=triton.next_power_of_2(G), P=csr.page_size, PAGES=pages,
        BLOCK_N=block_n, BLOCK_STAT=triton.next_power_of_2(num_splits), SHIFT=shift, NBINS=1 << bits,
        WITH_HIST=with_hist, num_warps=launch.num_warps,
    )
    return f, counts
