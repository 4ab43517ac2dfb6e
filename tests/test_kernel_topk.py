"""kvcache.kernels.topk.select_topk against torch.topk: the k largest of each row, tails always taken; every test runs
twice, through the radix levels and through one program per row in registers.

Positions come back unordered, so rows are compared as sets (distinct values) or by their sorted
values (ties: any choice among equal values is a correct top-k). Every call runs with
torch.empty poisoned (-7 for ints), so an output slot the kernels never write is caught.
Rows of 100 positions in blocks of 32 are split over several programs per row.
"""

import sys

import pytest
import torch
from kernel_support import INTERPRETED, poisoned_allocations

from kvcache.kernels import topk
from kvcache.kernels.topk import select_topk
from kvcache.kernels.tuning import TUNING, Launch

BLOCK = 32
IN_REGISTERS = False  # set by the _path fixture


@pytest.fixture(autouse=True, params=["radix_levels", "in_registers"])
def _path(request, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "IN_REGISTERS", request.param == "in_registers")


def run_topk(values, k, n_valid, n_total=None, block=BLOCK):
    n_valid_t = torch.tensor(n_valid, dtype=torch.int32)
    n_total_t = None if n_total is None else torch.tensor(n_total, dtype=torch.int32)
    with poisoned_allocations():
        positions = select_topk(values, k, n_valid_t, n_total_t, block=block, in_registers=IN_REGISTERS)
    assert positions.shape == (values.shape[0], k) and positions.dtype == torch.int32
    return positions.long()


def assert_is_topk(values, positions, k, n_valid, n_total=None):
    """Each row: k distinct positions in [0, n_total), every tail position [n_valid, n_total), and
    the values of the others are the k - tail largest of values[:n_valid] (sorted, so ties pass)."""
    n_total = n_valid if n_total is None else n_total
    for row, (pos, nv, nt) in enumerate(zip(positions, n_valid, n_total)):
        got = pos.tolist()
        assert all(0 <= p < nt for p in got), f"row {row}: positions {got} outside [0, {nt})"
        assert len(set(got)) == k, f"row {row}: duplicate positions {sorted(got)}"
        assert set(range(nv, nt)) <= set(got), f"row {row}: tail [{nv}, {nt}) not all taken"
        head = pos[pos < nv]
        expected = torch.topk(values[row, :nv], k - (nt - nv)).values
        torch.testing.assert_close(values[row, head].sort(descending=True).values, expected, rtol=0, atol=0)


def distinct_values(rows, n, seed=0):
    """Positive float32 values spread over many binades, all distinct."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.exp(4 * torch.randn((rows, n), generator=gen))
    assert values.unique().numel() == values.numel()
    return values


@pytest.mark.parametrize("k", [1, 13])
def test_distinct_values_give_the_positions_of_torch_topk(k):
    values = distinct_values(3, 100)
    positions = run_topk(values, k, [100, 100, 100])
    expected = torch.topk(values, k).indices
    for row in range(3):
        assert set(positions[row].tolist()) == set(expected[row].tolist())


def test_large_selections_take_their_own_launch_and_the_same_positions(monkeypatch):
    # Every selection counts as large here, so the radix levels run with TUNING["topk_large"], set to one program per
    # row that loops over its blocks (TUNING["topk"] gives each block of these rows a program of its own).
    monkeypatch.setattr(topk, "LARGE_SELECT_ITEMS", 0)
    monkeypatch.setitem(TUNING, "topk_large", Launch(block_n=BLOCK, num_warps=2, programs=1))
    values = distinct_values(3, 100, seed=2)
    positions = run_topk(values, 13, [100, 100, 100], block=None)
    expected = torch.topk(values, 13).indices
    for row in range(3):
        assert set(positions[row].tolist()) == set(expected[row].tolist())


def test_rows_of_different_lengths_select_within_their_own_length():
    values = distinct_values(3, 100, seed=1)
    n_valid = [100, 37, 13]
    for row, nv in enumerate(n_valid):
        values[row, nv:] = 1e30  # past the row's end: must never be read
    positions = run_topk(values, 13, n_valid)
    for row, nv in enumerate(n_valid):
        assert set(positions[row].tolist()) == set(torch.topk(values[row, :nv], 13).indices.tolist())


def _tied(pattern, gen):
    """[3, 100] values with heavy ties, each pattern tying on a different radix digit."""
    j = torch.randint(0, 3, (3, 100), generator=gen)
    if pattern == "three_values":  # ties decided at the first digit
        return torch.tensor([0.25, 0.5, 1.0])[j]
    if pattern == "all_equal":
        return torch.full((3, 100), 0.75)
    if pattern == "differ_in_middle_bits":  # equal on bits 30..20, decided on bits 19..8
        return 1.0 + j.float() * 2.0**-15
    if pattern == "differ_in_low_bits":  # equal on bits 30..8, decided on bits 7..0
        return 1.0 + j.float() * 2.0**-23
    raise ValueError(pattern)


@pytest.mark.parametrize("pattern", ["three_values", "all_equal", "differ_in_middle_bits", "differ_in_low_bits"])
def test_heavy_ties_give_k_distinct_positions_of_the_largest_values(pattern):
    values = _tied(pattern, torch.Generator().manual_seed(2))
    assert values.unique().numel() <= 3
    n_valid = [100, 71, 40]
    positions = run_topk(values, 30, n_valid)
    assert_is_topk(values, positions, 30, n_valid)


def test_tail_positions_are_always_taken():
    values = distinct_values(3, 100, seed=3)
    n_valid, n_total = [90, 30, 60], [100, 37, 60]
    for row, (nv, nt) in enumerate(zip(n_valid, n_total)):
        values[row, nv:nt] = 0.0  # the smallest values: taken only because they are the tail
    positions = run_topk(values, 12, n_valid, n_total)
    assert_is_topk(values, positions, 12, n_valid, n_total)


def test_a_budget_equal_to_the_tail_takes_only_the_tail():
    values = distinct_values(2, 64, seed=4)
    positions = run_topk(values, 10, [54, 40], [64, 50])
    assert [sorted(row.tolist()) for row in positions] == [list(range(54, 64)), list(range(40, 50))]


def test_exact_zeros_and_denormals_are_ranked_by_value():
    tiny = torch.finfo(torch.float32).tiny  # smallest normal; below it the values are denormal
    values = torch.zeros((3, 100))
    values[0, :10] = torch.arange(1, 11) * 2.0**-149  # the 10 smallest denormals and 90 zeros: some zeros are taken
    values[1, ::2] = torch.arange(1, 51) * 3e-42  # denormals spanning many low digits
    values[1, 1:20:2] = tiny * torch.arange(1, 11)  # a few normals above them
    values[2, :] = torch.where(torch.arange(100) % 3 == 0, tiny / 2, 0.0)  # one tied denormal and zeros
    assert (values[values > 0] < tiny).any()
    positions = run_topk(values, 40, [100, 100, 100])
    assert_is_topk(values, positions, 40, [100, 100, 100])


def test_k_equal_to_n_total_takes_every_position():
    values = distinct_values(3, 40, seed=5)
    positions = run_topk(values, 40, [40, 25, 0], [40, 40, 40])
    assert all(sorted(row.tolist()) == list(range(40)) for row in positions)


def test_a_per_row_k_fills_each_row_up_to_its_own_k():
    values = distinct_values(3, 100, seed=6)
    n_valid = [100, 37, 60]
    k = torch.tensor([5, 1, 9], dtype=torch.int32)
    with poisoned_allocations():
        positions = select_topk(values, k, torch.tensor(n_valid, dtype=torch.int32), block=BLOCK, k_max=9,
                                in_registers=IN_REGISTERS).long()
    assert positions.shape == (3, 9)
    for row, (kr, nv) in enumerate(zip(k.tolist(), n_valid)):
        assert set(positions[row, :kr].tolist()) == set(torch.topk(values[row, :nv], kr).indices.tolist())


def test_negative_zero_ranks_as_zero():
    # -0.0 >= 0 holds, so it is a valid score; its sign bit must not hide it from the selection.
    values = torch.full((1, 40), -0.0)
    values[0, :5] = 1.0
    positions = run_topk(values, 10, [40])
    assert_is_topk(values, positions, 10, [40])


def test_many_tied_candidates_are_finished_over_several_loop_steps():
    # 3000 equal values leave 3000 candidates after the first two digits: the row's last program
    # walks them in steps of kvcache.kernels.topk.FINISH_BLOCK (1024), ranking exact ties in arrival order.
    from kvcache.kernels.topk import FINISH_BLOCK

    n = 3 * FINISH_BLOCK - 72
    values = torch.full((2, n), 0.5)
    values[1, ::7] = 0.5 + 2.0**-20  # row 1: a few above, tied with each other on the top 16 bits
    positions = run_topk(values, 1500, [n, n], block=512)
    assert_is_topk(values, positions, 1500, [n, n])


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="long rows over many concurrent GPU programs")
@pytest.mark.parametrize("softmax", [False, True])
def test_long_rows_on_the_gpu_give_the_torch_topk(softmax):
    # The interpreter runs a row's programs one after another; here they race for the row's counters and the
    # last one finishes the candidates, as in a decode step (SparQ at 128K: rows of 131072, k = S/16).
    gen = torch.Generator(device="cuda").manual_seed(10)
    logits = 2 * torch.randn((8, 131072), generator=gen, device="cuda")
    values = torch.softmax(logits, dim=1) if softmax else torch.exp(logits)
    n_valid = [131072 - 2048] * 7 + [70000]
    n_total = [131072] * 7 + [71000]
    k = 8192
    positions = select_topk(values, k, torch.tensor(n_valid, dtype=torch.int32, device="cuda"),
                            torch.tensor(n_total, dtype=torch.int32, device="cuda"), in_registers=False)
    assert_is_topk(values.cpu(), positions.long().cpu(), k, n_valid, n_total)
