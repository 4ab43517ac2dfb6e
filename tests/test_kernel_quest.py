"""kvcache.kernels.quest.quest_decode against the torch reference kvcache.methods.quest (page bounds,
docs/sparse-attention.md §5).

Kernels run on the CPU under the Triton interpreter, so shapes are tiny and block sizes small.
Every kernel call runs with torch.empty / torch.empty_like poisoned (NaN for floats, -7 for
ints), so an output element the kernels never write shows up instead of passing by luck.
"""

import pytest
import torch
from kernel_support import HKV, INTERPRETED, NO_BF16_ON_CPU, assert_matches, poisoned_allocations, scattered_store

from kvcache.kernels.quest import quest_decode
from kvcache.methods import dense, quest

LENGTHS = (37, 1, 80)  # mixed; with pages of 8: 5 pages (the last partly filled), 1 page of 1 row, 10 full pages


def run_both(top_pages, lengths=LENGTHS, *, G=4, d=64, dtype=torch.float32, page_size=8, device="cpu"):
    """(out, lse) of the kernel under poisoned allocations, the reference's AttentionResult, and
    dense attention over the same batch."""
    store, ids = scattered_store(lengths, d=d, page_size=page_size, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((len(ids), HKV * G, d), generator=gen).to(dtype).to(device)
    csr = store.page_table(ids, 0)
    view = store.layer_view(0)
    with poisoned_allocations():
        out, lse = quest_decode(q, view.k_seq, view.v_seq, view.k_summary, csr, top_pages, block_n=16)
    ref = quest(q, view.k_seq, view.v_seq, view.k_summary, csr, top_pages)
    return out, lse, ref, dense(q, view.k_seq, view.v_seq, csr)


# A cross-section of (G, d, dtype, page size), not the full product: the interpreter is slow.
@pytest.mark.parametrize(
    "G, d, dtype, page_size",
    [
        pytest.param(1, 64, torch.float32, 8, id="G1-d64-f32-P8"),
        pytest.param(4, 128, torch.float16, 16, id="G4-d128-f16-P16"),
        pytest.param(8, 64, torch.float16, 8, id="G8-d64-f16-P8"),
        pytest.param(8, 128, torch.float32, 16, id="G8-d128-f32-P16"),
    ],
)
def test_quest_decode_matches_the_reference_on_a_mixed_batch(G, d, dtype, page_size, select_path):
    # 3 of 5 or 10 pages (or of 3 and 5 with pages of 16); the 1-page sequence reads its only page.
    out, lse, ref, _ = run_both(3, G=G, d=d, dtype=dtype, page_size=page_size)
    assert_matches(out, lse, ref, dtype)


def test_one_page_reads_only_the_last_page_as_the_reference():
    out, lse, ref, exact = run_both(1)
    assert_matches(out, lse, ref, torch.float32)
    assert not torch.allclose(out[0], exact.out[0], atol=1e-3), "one page of five should differ from dense"


@pytest.mark.parametrize("top_pages", [10, 100], ids=["n_pages", "more"])
def test_at_least_as_many_pages_as_the_longest_sequence_equals_dense(top_pages):
    out, lse, ref, exact = run_both(top_pages)
    assert_matches(out, lse, ref, torch.float32)
    assert_matches(out, lse, exact, torch.float32)


def test_more_pages_than_one_block_of_page_bounds_match_the_reference():
    # 19 pages of 8: more than one block of page bounds (16 pages in kvcache.kernels.tuning), so several splits.
    out, lse, ref, _ = run_both(7, lengths=(150, 41), dtype=torch.float16)
    assert_matches(out, lse, ref, torch.float16)


@pytest.mark.skipif(INTERPRETED, reason="bf16 needs compiled kernels: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_BF16_ON_CPU)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_bfloat16_matches_the_reference_on_the_gpu(G):
    out, lse, ref, _ = run_both(3, G=G, d=128, dtype=torch.bfloat16, page_size=16, device="cuda")
    assert_matches(out, lse, ref, torch.bfloat16)
