"""The row checksum of kvcache.store.tiers.row_checksums, computed in a kernel on rows it has already loaded.

A row's bytes as 32-bit words w_j (two 16-bit elements per word, the even one low), each times the odd weight
(2j + 1) * 0x9E3779B1, summed modulo 2^64. Attention kernels that read pinned host rows in place compare it with the
row's stored checksum and count the rows that differ (docs/tiers.md, "Checksums"): the rows are in registers
already, so checking costs arithmetic and the 8 bytes of each row's stored sum, not a second read of the row.
"""

from __future__ import annotations

import triton
import triton.language as tl

GOLDEN = 0x9E3779B1


@triton.jit
def row_checksum(x, BLOCK_N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Checksums [BLOCK_N] int64 of the rows of x [BLOCK_N, D] (BITS: 16 or 32 bits per element)."""
    if BITS == 32:
        words = x.to(tl.int32, bitcast=True)
        index = tl.arange(0, D)
    else:
        halves = tl.reshape(x.to(tl.int16, bitcast=True), [BLOCK_N, D // 2, 2])
        lo, hi = tl.split(halves)
        words = (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)
        index = tl.arange(0, D // 2)
    weight = (index.to(tl.int64) * 2 + 1) * GOLDEN
    return tl.sum(words.to(tl.int64) * weight[None, :], axis=1)
