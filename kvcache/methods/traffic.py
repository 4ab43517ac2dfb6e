"""Bytes each attention method must read: one formula per method, shared by the references and kernels."""

from __future__ import annotations

from collections.abc import Sequence

from kvcache.config import SUMMARY_DTYPE

VALUE_MEAN_ITEMSIZE = SUMMARY_DTYPE.itemsize  # the mean value comes from float32 running sums
SUMMARY_ROWS_READ = 2  # Quest reads min and max; the mean is for learned gates


def dense_bytes(lens: Sequence[int], num_kv_heads: int, d: int, itemsize: int) -> int:
    """Dense: every cached K and V row, 2*S*d elements per kv head."""
    return sum(2 * S * d * itemsize * num_kv_heads for S in lens)


def sparq_bytes(lens: Sequence[int], num_kv_heads: int, d: int, r: int, k: int, itemsize: int) -> int:
    """SparQ (ALGORITHMS.md §1), per kv head: S*r key elements, 2*k*d rows, d of the mean value (float32)."""
    return sum(((S * r + 2 * k * d) * itemsize + d * VALUE_MEAN_ITEMSIZE) * num_kv_heads for S in lens)


def quest_bytes(lens: Sequence[int], page_size: int, top_pages: int, num_kv_heads: int, d: int, itemsize: int) -> int:
    """Quest, per kv head: min and max summaries (float32) of every page, then the filled rows of the chosen pages."""
    total = 0
    for S in lens:
        n = -(-S // page_size)
        t = min(top_pages, n)
        # The last (possibly partial) page is always among the chosen.
        rows = S if t == n else (t - 1) * page_size + (S - (n - 1) * page_size)
        summaries = n * SUMMARY_ROWS_READ * d * SUMMARY_DTYPE.itemsize
        total += (summaries + 2 * rows * d * itemsize) * num_kv_heads
    return total


def quest_pages_for_share(context: int, page_size: int, share: float, d: int, itemsize: int) -> int:
    """Pages a Quest choice may read so that quest_bytes comes to `share` of dense's 2*d*itemsize bytes per
    position, at least 2: pages = S/P * (share - 2*d*4 / (2*P*d*itemsize)), the float32 min/max of every page
    read first."""
    scoring = SUMMARY_ROWS_READ * d * SUMMARY_DTYPE.itemsize / (2 * page_size * d * itemsize)
    return max(2, int(context * (share - scoring)) // page_size)


# The learned gate (ALGORITHMS.md §3) scores a page by its cached gate key kg = RoPE(W_k [max, min, mean], page),
# dg values in the key cache's dtype (kvcache.methods.gate_store.GateKeyCache), not by its 3d float32 summaries: the
# summaries are read once, when a page's keys are appended. The gate's query weights ([G*d x dg] per kv head,
# float32) are model parameters like the model's own projections and are not counted as cache traffic;
# bench/decode.py counts them in its gate.score row.


def gate_budget_pages(S: int, page_size: int, budget: int | None) -> int:
    """Pages a gate with a token `budget` reads of a sequence of S positions (first and last included)."""
    n = -(-S // page_size)
    return n if budget is None or n <= 2 else min(n, max(2, -(-budget // page_size)))


def gate_key_bytes(num_pages: int, gate_dim: int, key_itemsize: int) -> int:
    """Bytes gate scoring reads per kv head of a sequence of `num_pages` pages: one cached gate key per page."""
    return num_pages * gate_dim * key_itemsize


def gate_bytes(lens: Sequence[int], page_size: int, pages_read: Sequence[Sequence[int]], d: int, itemsize: int,
               gate_dim: int, key_itemsize: int) -> int:
    """Learned gate (§3), per kv head: the cached gate key (gate_dim values of key_itemsize bytes) of every page,
    then the filled K/V rows of the pages it chose; pages_read[b][h] counts them for kv head h of sequence b
    (the last page among them)."""
    total = 0
    for S, per_head in zip(lens, pages_read):
        n = -(-S // page_size)
        last_rows = S - (n - 1) * page_size
        for t in per_head:
            rows = S if t >= n else (t - 1) * page_size + last_rows
            total += gate_key_bytes(n, gate_dim, key_itemsize) + 2 * rows * d * itemsize
    return total


def gate_budget_for_share(context: int, page_size: int, share: float, d: int, itemsize: int, gate_dim: int,
                          key_itemsize: int) -> int:
    """A token budget whose gate reads (gate_bytes) come to `share` of dense's 2*d*itemsize bytes per position,
    rounded down to whole pages, at least 2 pages: budget = S * (share - dg*key_itemsize / (2*P*d*itemsize))."""
    scoring = gate_dim * key_itemsize / (2 * page_size * d * itemsize)
    return max(2 * page_size, int(context * (share - scoring)) // page_size * page_size)
