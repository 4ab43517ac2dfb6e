"""kvcache.kernels.sparq.sparq_decode against the torch reference kvcache.methods.sparq (docs/sparse-attention.md §1).

Kernels run on the CPU under the Triton interpreter, so shapes are tiny and block sizes small
(stage 1 over 2 splits of 32 positions, the top-k in one block of 64). Every kernel call runs with
torch.empty / torch.empty_like poisoned (NaN for floats, -7 for ints), so an element the kernels
never write shows up instead of passing by luck.
"""

import pytest
import torch
from kernel_support import HKV, INTERPRETED, NO_BF16_ON_CPU, assert_matches, poisoned_allocations, scattered_store

from kvcache.kernels.sparq import sparq_decode
from kvcache.methods import dense, sparq

LENGTHS = (37, 11, 61)  # mixed and odd: every last page is partly filled
K = 6  # positions read in stage 2, <= every length
BLOCKS = {"block_n": 32, "topk_block": 64}


def run_both(lengths=LENGTHS, *, G=4, d=64, dtype=torch.float32, page_size=8, device="cpu", **params):
    """(out, lse) of the kernel under poisoned allocations, the reference's AttentionResult, and the
    store's tensors (csr, view, q) for further references."""
    store, ids = scattered_store(lengths, d=d, page_size=page_size, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((len(ids), HKV * G, d), generator=gen).to(dtype).to(device)
    csr = store.page_table(ids, 0)
    view = store.layer_view(0)
    value_mean = store.value_mean(ids, 0)
    args = (q, view.k_seq, view.k_dim, view.v_seq, value_mean, csr)
    with poisoned_allocations():
        out, lse = sparq_decode(*args, **params, **BLOCKS)
    return out, lse, sparq(*args, **params), (q, view, csr)


# A cross-section of (G, d, dtype, page size), not the full product: the interpreter is slow.
@pytest.mark.parametrize(
    "G, d, dtype, page_size",
    [
        pytest.param(1, 64, torch.float32, 8, id="G1-d64-f32-P8"),
        pytest.param(4, 128, torch.float16, 16, id="G4-d128-f16-P16"),
        pytest.param(8, 64, torch.float16, 8, id="G8-d64-f16-P8"),
        # G >= 16 takes stage 1's tensor-core (tl.dot) path instead of the FMA one.
        pytest.param(16, 64, torch.float32, 8, id="G16-d64-f32-P8"),
    ],
)
def test_sparq_decode_matches_the_reference_on_a_mixed_batch(G, d, dtype, page_size, select_path):
    out, lse, ref, _ = run_both(G=G, d=d, dtype=dtype, page_size=page_size, r=d // 8, k=K, local_window=2)
    assert_matches(out, lse, ref, dtype)


@pytest.mark.parametrize("r", [1, 64], ids=["r=1", "r=d"])
def test_one_or_all_query_components_match_the_reference(r):
    out, lse, ref, _ = run_both(r=r, k=K, local_window=2)
    assert_matches(out, lse, ref, torch.float32)


def test_without_reallocation_matches_the_reference():
    out, lse, ref, _ = run_both(dtype=torch.float16, r=8, k=K, local_window=2, reallocate=False)
    assert_matches(out, lse, ref, torch.float16)


@pytest.mark.parametrize("local_window", [0, K], ids=["no-window", "window=k"])
def test_no_local_window_or_one_as_large_as_k_matches_the_reference(local_window):
    out, lse, ref, _ = run_both(r=8, k=K, local_window=local_window)
    assert_matches(out, lse, ref, torch.float32)


def test_reading_every_position_equals_dense():
    # k = S: stage 2 is exact attention over all rows, and alpha = 1 so vbar gets no weight.
    out, lse, ref, (q, view, csr) = run_both((45, 45), r=4, k=45, local_window=3)
    assert_matches(out, lse, ref, torch.float32)
    exact = dense(q, view.k_seq, view.v_seq, csr)
    assert_matches(out, lse, exact, torch.float32)


def test_a_sequence_of_length_one_with_k_of_one_matches_the_reference():
    out, lse, ref, _ = run_both((1, 23), r=4, k=1, local_window=1)
    assert_matches(out, lse, ref, torch.float32)


@pytest.mark.skipif(INTERPRETED, reason="bf16 needs compiled kernels: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_BF16_ON_CPU)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_bfloat16_matches_the_reference_on_the_gpu(G):
    out, lse, ref, _ = run_both(G=G, d=128, dtype=torch.bfloat16, page_size=16, device="cuda",
                                r=16, k=K, local_window=2)
    assert_matches(out, lse, ref, torch.bfloat16)


def test_selecting_twice_from_one_stage_1_gives_the_same_positions():
    # Stage 1 zeroes the selection's workspace; a second selection on the same stage-1 result must
    # not reuse the filled one (the benchmark times the selection alone this way).
    from kvcache.kernels.sparq import sparq_select, sparq_stage1

    store, ids = scattered_store(LENGTHS, d=64, page_size=8, dtype=torch.float32, device="cpu")
    q = torch.randn((len(ids), HKV * 4, 64), generator=torch.Generator().manual_seed(3))
    csr = store.page_table(ids, 0)
    s1 = sparq_stage1(q, store.layer_view(0).k_dim, csr, 8, block_n=32)
    first = sparq_select(s1, csr, HKV, K, 2, block_n=32, topk_block=64)
    second = sparq_select(s1, csr, HKV, K, 2, block_n=32, topk_block=64)
    assert [sorted(r) for r in first.tolist()] == [sorted(r) for r in second.tolist()]
