"""Per-split softmax statistics (max, sum of exp) inside a kernel: kept over a split, then merged over the splits."""

import triton
import triton.language as tl


@triton.jit
def merged_softmax_stats(stat_m_ptr, stat_l_ptr, row, num_splits, offs_g, mask_g,
                         G: tl.constexpr, BLOCK_STAT: tl.constexpr):
    """Global (max, sum of exp(x - max)) per query head of `row` from its splits' [splits, G] partials.

    An empty row gets max 0 and sum 0 (its heads saw no position)."""
    offs_s = tl.arange(0, BLOCK_STAT)
    idx = (row * num_splits + offs_s)[:, None] * G + offs_g[None, :]
    mask = (offs_s < num_splits)[:, None] & mask_g[None, :]
    part_m = tl.load(stat_m_ptr + idx, mask=mask, other=float("-inf"))
    part_l = tl.load(stat_l_ptr + idx, mask=mask, other=0.0)
    glob_m = tl.max(part_m, axis=0)
    glob_m = tl.where(glob_m == float("-inf"), 0.0, glob_m)
    return glob_m, tl.sum(part_l * tl.exp(part_m - glob_m[None, :]), axis=0)


@triton.jit
def running_softmax_stats(m_i, l_i, x):
    """(max, sum of exp(x - max)) per row of [rows, n] logits x folded into the running (m_i, l_i); -inf-only
    rows keep max -inf and sum 0."""
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
