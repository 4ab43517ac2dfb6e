"""kernels.sparq_select.sparq_topk against torch: the window plus the k - l largest group-mean scores.

Logits and their softmax stats are made here in torch, as stage 1 leaves them. Few samples per row
make the bracket a real estimate (not every position), a negative margin makes it miss so the
row's last program must start over, and tied logits exercise the exact finish. Every call runs
with torch.empty poisoned, so an output slot never written is caught.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

import pytest
import torch
from kernel_support import HKV, poisoned_allocations, scattered_store

from kernels.sparq_select import sparq_topk

LENGTHS = (61, 37, 130)
G = 4


def setup(lengths=LENGTHS, seed=0, tie_levels=None):
    """(logits [B*Hkv, G, S_pad], stat_m, stat_l [B*Hkv, 1, G], csr, scores f [B*Hkv, S_pad]) for random logits;
    tie_levels rounds the logits to that many distinct values (many exact ties in f)."""
    store, ids = scattered_store(lengths, d=16, page_size=8, dtype=torch.float32, device="cpu")
    csr = store.page_table(ids, 0)
    rows, width = len(ids) * HKV, max(lengths) + 3
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn((rows, G, width), generator=gen)
    if tie_levels:  # every head the same rounded logits: f takes at most tie_levels + 1 values
        logits = (torch.floor(logits[:, :1].clamp(-3, 3) * tie_levels / 6) / tie_levels).expand(-1, G, -1).contiguous()
    lens = torch.tensor(lengths).repeat_interleave(HKV)
    live = torch.arange(width)[None, None, :] < lens[:, None, None]
    masked = torch.where(live, logits, float("-inf"))
    stat_m = masked.amax(dim=2, keepdim=True)
    stat_l = torch.exp(masked - stat_m).sum(dim=2, keepdim=True)
    f = (torch.exp(masked - stat_m) / (G * stat_l)).sum(dim=1)
    return logits, stat_m.transpose(1, 2).contiguous(), stat_l.transpose(1, 2).contiguous(), csr, f, lens


def check(positions, f, lens, k, local_window):
    for row, n in enumerate(lens.tolist()):
        got = positions[row].tolist()
        n_valid = n - local_window
        assert len(set(got)) == k and all(0 <= p < n for p in got), f"row {row}: {sorted(got)}"
        assert set(range(n_valid, n)) <= set(got), f"row {row}: window not all taken"
        head = torch.tensor([p for p in got if p < n_valid], dtype=torch.long)
        expected = torch.topk(f[row, :n_valid], k - local_window).values
        torch.testing.assert_close(f[row, head].sort(descending=True).values, expected, rtol=0, atol=0)


def run(logits, stat_m, stat_l, csr, k, local_window, **kw):
    counters = torch.zeros((logits.shape[0], 4), dtype=torch.int32)
    with poisoned_allocations():
        return sparq_topk(logits, stat_m, stat_l, csr, HKV, k, local_window, counters, block_n=16, **kw).long()


@pytest.mark.parametrize("samples", [8, 256], ids=["8-samples", "all-positions"])
@pytest.mark.parametrize("k, local_window", [(20, 4), (9, 0), (37, 37)])
def test_the_window_and_the_largest_scores_are_chosen(samples, k, local_window):
    logits, stat_m, stat_l, csr, f, lens = setup()
    positions = run(logits, stat_m, stat_l, csr, k, local_window, samples=samples)
    check(positions, f, lens, k, local_window)


@pytest.mark.parametrize("finish_block", [256, 8], ids=["in-registers", "over-memory"])
def test_a_bracket_that_misses_falls_back_to_an_exact_select_over_the_row(finish_block):
    # A negative margin puts t_hi below and t_lo above the k-th score: the check fails, the row's
    # last program starts over alone (and with finish_block 8, walks its candidates in memory).
    logits, stat_m, stat_l, csr, f, lens = setup(seed=1)
    positions = run(logits, stat_m, stat_l, csr, 20, 4, samples=8, margin_sigmas=-50.0, finish_block=finish_block)
    check(positions, f, lens, 20, 4)


@pytest.mark.parametrize("finish_block", [256, 8], ids=["in-registers", "over-memory"])
def test_tied_scores_give_k_distinct_positions_of_the_largest(finish_block):
    logits, stat_m, stat_l, csr, f, lens = setup(seed=2, tie_levels=2)
    assert f[0, :61].unique().numel() <= 3
    positions = run(logits, stat_m, stat_l, csr, 25, 5, samples=8, finish_block=finish_block)
    check(positions, f, lens, 25, 5)
