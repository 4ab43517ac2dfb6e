"""kvcache.kernels.group_topk against torch: the forced tail plus the top k - tail of f = mean_g softmax(x_g), rows
long enough to spread over several programs, for flat, peaked and tied scores.

Under the interpreter the kernel runs its five phases as five launches (a barrier cannot open when programs run
one at a time); the one-launch path is the same code with the barriers in, checked against these on a GPU.
"""

import pytest
import torch
from kernel_support import INTERPRETED, poisoned_allocations

from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.group_topk import BLOCK, group_topk
from kvcache.kernels.topk import topk_workspace

DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
HKV = 2
PAGE = 16
LENGTHS = (2 * BLOCK + 77, 300, 3 * BLOCK + 5)  # the first and last span several programs' slices


def csr_of(lengths, device):
    """A page table whose pages are handed out in reverse, so no row reads its neighbour's slots by luck."""
    pages = [-(-n // PAGE) for n in lengths]
    ids = torch.arange(sum(pages) - 1, -1, -1, dtype=torch.int32)
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * PAGE for n, p in zip(lengths, pages)], dtype=torch.int32)
    return PageTableCSR(indptr.to(device), ids.to(device), last.to(device), PAGE, tuple(lengths))


def split_stats(logits, lengths, splits):
    """Per-split softmax max and sum per head over each row's positions, as stage 1 leaves them."""
    rows, G, width = logits.shape
    n = torch.tensor(lengths).repeat_interleave(HKV)
    per = -(-width // splits)
    stat_m = torch.full((rows, splits, G), float("-inf"))
    stat_l = torch.zeros((rows, splits, G))
    for s in range(splits):
        part = logits[:, :, s * per : (s + 1) * per]
        live = (torch.arange(part.shape[2]) + s * per)[None, :] < n[:, None]
        part = torch.where(live[:, None, :], part, float("-inf"))
        stat_m[:, s] = part.amax(dim=2)
        safe = torch.where(stat_m[:, s].isinf(), 0.0, stat_m[:, s])
        stat_l[:, s] = torch.exp(part - safe[:, :, None]).sum(dim=2)
    return stat_m, stat_l


def reference(logits, lengths, k, tail):
    """Per row: the chosen positions' f values sorted (ties make positions ambiguous, values are not), and the
    tail it must hold."""
    out = []
    for r in range(logits.shape[0]):
        S = lengths[r // HKV]
        f = torch.softmax(logits[r, :, :S], dim=-1).mean(0)
        t = min(tail, S)
        top = torch.topk(f[: S - t], k - t).values if k > t else f[:0]
        out.append((torch.sort(torch.cat([top, f[S - t :]])).values, set(range(S - t, S))))
    return out


@pytest.mark.parametrize("kind", ["flat", "peaked", "tied"])
@pytest.mark.parametrize("G", [1, 4])
def test_the_chosen_positions_are_the_tail_and_the_largest_scores(kind, G):
    gen = torch.Generator().manual_seed(7)
    width = max(LENGTHS) + 11
    rows = len(LENGTHS) * HKV
    logits = torch.randn((rows, G, width), generator=gen)
    if kind == "peaked":  # a few positions hold nearly all the mass; most f underflow to tiny values
        logits = 30 * logits
    elif kind == "tied":  # few distinct values: exact ties at the threshold
        logits = torch.randint(0, 3, (rows, G, width), generator=gen).float()
    # A head-major view of position-major memory, as stage 1 writes it.
    logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    stat_m, stat_l = split_stats(logits, LENGTHS, splits=3)
    k, tail = 257, 40
    csr = csr_of(LENGTHS, DEVICE)
    ws = topk_workspace(rows, torch.device(DEVICE))
    with poisoned_allocations():
        chosen = group_topk(logits.to(DEVICE), stat_m.to(DEVICE), stat_l.to(DEVICE), csr, HKV, k, tail, ws)
    chosen = chosen.cpu()
    for r, (want_values, want_tail) in enumerate(reference(logits, LENGTHS, k, tail)):
        S = LENGTHS[r // HKV]
        pos = chosen[r].tolist()
        assert len(set(pos)) == k and all(0 <= p < S for p in pos), f"row {r}: {sorted(pos)[:5]}..."
        assert want_tail <= set(pos)
        f = torch.softmax(logits[r, :, :S], dim=-1).mean(0)
        torch.testing.assert_close(torch.sort(f[pos]).values, want_values, rtol=1e-5, atol=0)


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="the one-launch path needs a GPU")
def test_one_launch_chooses_what_the_phased_launches_choose_on_the_gpu():
    gen = torch.Generator().manual_seed(3)
    lengths = (131072, 40000, 65536, 9000)
    rows, G = len(lengths) * HKV, 4
    logits = 3 * torch.randn((rows, G, max(lengths)), generator=gen)
    stat_m, stat_l = split_stats(logits, lengths, splits=8)
    csr = csr_of(lengths, "cuda")
    args = (logits.cuda(), stat_m.cuda(), stat_l.cuda(), csr, HKV, 4096, 1024)
    one = group_topk(*args, topk_workspace(rows, torch.device("cuda")), phased=False)
    phased = group_topk(*args, topk_workspace(rows, torch.device("cuda")), phased=True)
    assert torch.equal(torch.sort(one.long(), 1).values, torch.sort(phased.long(), 1).values)
