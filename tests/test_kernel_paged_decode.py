"""kvcache.kernels.paged_decode.paged_decode against the torch reference kvcache.methods.dense.

Kernels run on the CPU under the Triton interpreter, so shapes are tiny and block sizes small.
Every kernel call runs with torch.empty / torch.empty_like poisoned (NaN for floats, -7 for
ints), so an output element the kernels never write shows up as NaN instead of passing by luck.
"""

import math

import pytest
import torch
from kernel_support import HKV, INTERPRETED, NO_BF16_ON_CPU, assert_matches, poisoned_allocations, scattered_store

from kvcache.kernels.paged_decode import paged_decode
from kvcache.methods import dense

LENGTHS = (37, 1, 80)  # mixed; odd with a partly filled last page, a single position, full last page

# A cross-section of (G, d, dtype, page size), not the full product: the interpreter is slow.
CASES = [
    pytest.param(1, 64, torch.float32, 8, id="G1-d64-f32-P8"),
    pytest.param(4, 128, torch.float16, 16, id="G4-d128-f16-P16"),
    pytest.param(8, 64, torch.float16, 8, id="G8-d64-f16-P8"),
    pytest.param(4, 64, torch.float32, 16, id="G4-d64-f32-P16"),
    pytest.param(8, 128, torch.float32, 8, id="G8-d128-f32-P8"),
]


def query(batch, G, d, dtype, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, HKV * G, d), generator=gen).to(dtype).to(device)


def run_kernel(store, ids, q, **kw):
    csr = store.page_table(ids, 0)
    view = store.layer_view(0)
    with poisoned_allocations():
        out, lse = paged_decode(q, view.k_seq, view.v_seq, csr, **kw)
    return out, lse, dense(q, view.k_seq, view.v_seq, csr, scale=kw.get("scale"))


def test_poisoned_allocations_fill_new_tensors_with_nan_or_a_sentinel():
    with poisoned_allocations():
        assert torch.empty(3).isnan().all()
        assert torch.empty_like(torch.zeros(2, dtype=torch.float16)).isnan().all()
        assert (torch.empty(3, dtype=torch.int32) == -7).all()
    assert not torch.zeros(3).isnan().any()


def test_the_test_batches_read_scattered_page_ids():
    store, ids = scattered_store(LENGTHS)
    csr = store.page_table(ids, 0)
    pages = [csr.pages_of(b).tolist() for b in range(len(ids))]
    assert [len(p) for p in pages] == [5, 1, 10]
    assert csr.last_page_len.tolist() == [5, 1, 8]
    runs = [p for p in pages if len(p) > 1]
    assert all(any(b != a + 1 for a, b in zip(p, p[1:])) for p in runs), pages
    assert any(b < a for p in runs for a, b in zip(p, p[1:])), "freed ids are reused out of order"


@pytest.mark.parametrize("G, d, dtype, page_size", CASES)
def test_paged_decode_matches_dense_on_a_mixed_batch(G, d, dtype, page_size):
    store, ids = scattered_store(LENGTHS, d=d, page_size=page_size, dtype=dtype)
    q = query(len(ids), G, d, dtype)
    out, lse, ref = run_kernel(store, ids, q, block_n=16)
    assert_matches(out, lse, ref, dtype)


def test_default_block_size_and_split_plan_match_dense():
    store, ids = scattered_store(LENGTHS, d=64, dtype=torch.float16)
    q = query(len(ids), 4, 64, torch.float16)
    out, lse, ref = run_kernel(store, ids, q)
    assert_matches(out, lse, ref, torch.float16)


@pytest.mark.parametrize("num_splits", [8, 32])
def test_more_splits_than_blocks_leave_empty_splits_that_merge_to_nothing(num_splits):
    # 80 positions in blocks of 16 fill 5 splits at most; the rest (and all but one for S=1) are empty.
    store, ids = scattered_store(LENGTHS)
    q = query(len(ids), 4, 64, torch.float32)
    out, lse, ref = run_kernel(store, ids, q, block_n=16, num_splits=num_splits)
    assert_matches(out, lse, ref, torch.float32)


def test_a_single_split_matches_dense():
    store, ids = scattered_store(LENGTHS, dtype=torch.float16)
    q = query(len(ids), 8, 64, torch.float16)
    out, lse, ref = run_kernel(store, ids, q, block_n=16, num_splits=1)
    assert_matches(out, lse, ref, torch.float16)


def test_a_sequence_of_length_one_returns_its_only_value_row():
    store, ids = scattered_store((1,))
    q = query(1, 4, 64, torch.float32)
    out, lse, _ = run_kernel(store, ids, q, block_n=16)
    (page,) = store.page_table(ids, 0).pages_of(0).tolist()
    view = store.layer_view(0)
    k_row, v_row = view.k_seq[page, :, 0], view.v_seq[page, :, 0]  # [Hkv, d]
    expected_lse = torch.einsum("hgd,hd->hg", q[0].view(HKV, 4, 64), k_row).reshape(-1) / math.sqrt(64)
    torch.testing.assert_close(out[0], v_row.repeat_interleave(4, dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[0], expected_lse, rtol=1e-5, atol=1e-5)


def test_forked_sequences_that_share_pages_match_dense():
    store, (parent,) = scattered_store((29,))
    child = store.fork(parent).seq_id  # shares the 3 full pages; its partial page is copied on write
    gen = torch.Generator().manual_seed(5)
    store.append(child, torch.randn((12, HKV, 64), generator=gen), torch.randn((12, HKV, 64), generator=gen), layer=0)
    csr = store.page_table([parent, child], 0)
    assert csr.pages_of(0)[:3].tolist() == csr.pages_of(1)[:3].tolist()
    q = query(2, 4, 64, torch.float32)
    out, lse, ref = run_kernel(store, [parent, child], q, block_n=16)
    assert_matches(out, lse, ref, torch.float32)


def test_an_explicit_scale_is_applied():
    store, ids = scattered_store(LENGTHS)
    q = query(len(ids), 4, 64, torch.float32)
    out, lse, ref = run_kernel(store, ids, q, block_n=16, scale=0.3)
    assert_matches(out, lse, ref, torch.float32)


@pytest.mark.skipif(INTERPRETED, reason="bf16 needs compiled kernels: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_BF16_ON_CPU)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_bfloat16_matches_dense_on_the_gpu(G):
    store, ids = scattered_store(LENGTHS, d=128, page_size=16, dtype=torch.bfloat16, device="cuda")
    q = query(len(ids), G, 128, torch.bfloat16, device="cuda")
    out, lse, ref = run_kernel(store, ids, q, block_n=16)
    assert_matches(out, lse, ref, torch.bfloat16)
