"""The row checksum of kvcache.store.tiers.row_checksums, computed in a kernel on rows it has already loaded.

A row's elements as unsigned integers of their width (16 or 32 bits), the j-th times the odd weight
(2j + 1) * 0x9E3779B1, summed modulo 2^32. Attention kernels that read pinned host rows in place compare it with the
row's stored checksum and count the rows that differ (docs/tiers.md, "Checksums"): the rows are in registers
already, so checking costs 32-bit arithmetic and the 4 bytes of each row's stored sum, not a second read of the
row. Elements, not 32-bit words, so that no reshape of the tile (a shuffle through shared memory) is needed.
"""

from __future__ import annotations

import triton
import triton.language as tl

GOLDEN: tl.constexpr = tl.constexpr(0x9E3779B1)  # a jitted function reads only constexpr globals


@triton.jit
def row_checksum(x, D: tl.constexpr, BITS: tl.constexpr):
    """Checksums [BLOCK_N] (uint32) of the rows of x [BLOCK_N, D] (BITS: 16 or 32 bits per element)."""
    if BITS == 32:
        words = x.to(tl.uint32, bitcast=True)
    else:
        words = x.to(tl.uint16, bitcast=True).to(tl.uint32)
    # Unsigned: products and sums wrap modulo 2^32, as the definition says.
    weight = (tl.arange(0, D).to(tl.uint32) * 2 + 1) * tl.full([1], GOLDEN, tl.uint32)
    return tl.sum(words * weight[None, :], axis=1)
