"""kvcache.kernels.group_scores against torch: f = mean over a GQA group of each head's softmax, the row counts, and
the top-k's level-0 histogram, for positions (SparQ) and pages (Quest).

The logits are split into parts as the producing kernels split them, with per-part softmax stats made
here in torch; outputs are poisoned before each run, so an element the kernel never writes is caught.
"""

import pytest
import torch
from kernel_support import HKV, poisoned_allocations, scattered_store

from kvcache.kernels.group_scores import group_scores
from kvcache.kernels.topk import LEVELS

LENGTHS = (61, 37, 130)  # positions; at page 8: 8, 5 and 17 pages
PAGE = 8


def run(items, G, items_per_split, tail, pages, k_cap=0, seed=0):
    store, ids = scattered_store(LENGTHS, d=16, page_size=PAGE, dtype=torch.float32, device="cpu")
    csr = store.page_table(ids, 0)
    rows, width = len(ids) * HKV, max(items) + 5
    logits = 4 * torch.randn((rows, G, width), generator=torch.Generator().manual_seed(seed))
    n = torch.tensor(items).repeat_interleave(HKV)
    splits = -(-width // items_per_split)
    stat_m = torch.full((rows, splits, G), float("-inf"))
    stat_l = torch.zeros((rows, splits, G))
    for s in range(splits):  # as the producing kernel leaves them: max and sum of exp per part and head
        part = logits[:, :, s * items_per_split : (s + 1) * items_per_split]
        live = (torch.arange(part.shape[2]) + s * items_per_split)[None, :] < n[:, None]
        part = torch.where(live[:, None, :], part, float("-inf"))
        stat_m[:, s] = part.amax(dim=2)
        safe = torch.where(stat_m[:, s].isinf(), 0.0, stat_m[:, s])
        stat_l[:, s] = torch.exp(part - safe[:, :, None]).sum(dim=2)
    hist0 = torch.zeros((rows, 1 << LEVELS[0][1]), dtype=torch.int32)
    with poisoned_allocations():
        f, counts = group_scores(logits, stat_m, stat_l, items_per_split, csr, HKV, tail, hist0, pages=pages,
                                 k_cap=k_cap, block_n=16)
    return logits, n, f, counts, hist0


@pytest.mark.parametrize("G", [1, 4, 3])
@pytest.mark.parametrize("pages", [False, True], ids=["positions", "pages"])
def test_scores_counts_and_histogram_match_torch(G, pages):
    items = [-(-L // PAGE) for L in LENGTHS] if pages else list(LENGTHS)
    tail = 1 if pages else 6
    logits, n, f, counts, hist0 = run(items, G, 32, tail, pages, k_cap=6)
    shift, bits = LEVELS[0]
    for row, total in enumerate(n.tolist()):
        x = logits[row, :, :total]
        expected = torch.softmax(x, dim=1).mean(dim=0)
        valid = total - tail
        torch.testing.assert_close(f[row, :valid], expected[:valid], rtol=1e-5, atol=1e-7)
        assert counts["n_valid"][row] == valid and counts["n_total"][row] == total
        if pages:
            assert counts["k"][row] == min(total, 6)
        digits = (f[row, :valid].view(torch.int32) >> shift) & ((1 << bits) - 1)
        assert torch.equal(hist0[row], torch.bincount(digits.long(), minlength=1 << bits).int())
