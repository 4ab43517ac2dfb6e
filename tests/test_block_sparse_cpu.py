"""The CPU sparse prefill (kvcache.prefill.block_sparse_cpu) against the torch reference, which computes every pair
of a head and masks: every index kind, odd lengths, chunks starting mid-block, GQA, query batches that split."""

import pytest
import torch
from kernel_support import TOL, assert_matches
from test_kernel_sparse_prefill import Result, build, chunk

from kvcache.prefill.block_sparse_cpu import block_sparse_prefill, listed_positions
from kvcache.prefill.minference import minference_prefill
from kvcache.prefill.minference_index import SparseIndex

CASES = [
    ("block_sparse", 157, 37, 1, torch.float32),
    ("block_sparse", 118, 0, 4, torch.float16),
    ("vertical_slash", 203, 32, 1, torch.float32),
    ("vertical_slash", 141, 75, 4, torch.float32),
    ("a_shape", 173, 0, 1, torch.float32),
    ("a_shape", 150, 90, 4, torch.float16),
    ("causal", 99, 13, 2, torch.float32),
]


@pytest.mark.parametrize("query_blocks", [1, 3, 16])
@pytest.mark.parametrize("pattern, length, start, G, dtype", CASES)
def test_it_gives_the_reference_s_out_and_lse(pattern, length, start, G, dtype, query_blocks):
    q, k_seq, v_seq, csr = chunk(length, start, G, dtype)
    index = build(pattern, q, k_seq, csr, start)
    out, lse = block_sparse_prefill(q, k_seq, v_seq, csr, index, query_blocks=query_blocks)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert_matches(out, lse, Result(*minference_prefill(q, k_seq, v_seq, csr, index)), dtype)


def test_a_scale_is_applied_as_the_reference_applies_it():
    q, k_seq, v_seq, csr = chunk(157, 37, 2, torch.float32)
    index = build("vertical_slash", q, k_seq, csr, 37)
    out, lse = block_sparse_prefill(q, k_seq, v_seq, csr, index, scale=0.05)
    assert_matches(out, lse, Result(*minference_prefill(q, k_seq, v_seq, csr, index, scale=0.05)), torch.float32)


def test_a_query_with_no_listed_key_gets_zero_and_minus_infinity():
    q, k_seq, v_seq, csr = chunk(70, 0, 1, torch.float32)
    index = build("block_sparse", q, k_seq, csr, 0)
    empty = index.block_count.clone()
    empty[:, 1] = 0  # the second query block of every head lists nothing
    index = SparseIndex(index.block_size, index.start, index.num_queries, index.block_index, empty,
                        index.column_index, index.column_count)
    out, lse = block_sparse_prefill(q, k_seq, v_seq, csr, index)
    rows = slice(index.block_size, 2 * index.block_size)
    assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isinf(lse[rows]).all()
    ref = Result(*minference_prefill(q, k_seq, v_seq, csr, index))
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(out, ref.out, rtol=rtol, atol=atol)


def test_the_listed_positions_are_the_blocks_rows_then_the_columns():
    q, k_seq, _, csr = chunk(141, 75, 1, torch.float32)
    index = build("vertical_slash", q, k_seq, csr, 75)
    positions, listed = listed_positions(index)
    B = index.block_size
    for h in range(index.num_heads):
        for m in range(index.num_query_blocks):
            blocks = index.block_index[h, m, : int(index.block_count[h, m])].tolist()
            columns = index.column_index[h, m, : int(index.column_count[h, m])].tolist()
            want = [blk * B + r for blk in blocks for r in range(B)] + columns
            assert positions[h, m][listed[h, m]].tolist() == want


def test_a_chunk_the_index_is_not_for_is_refused_with_its_shape():
    q, k_seq, v_seq, csr = chunk(118, 0, 2, torch.float32)
    index = build("block_sparse", q, k_seq, csr, 0)
    for wrong in (q[:-1], q[:, :-1], q[0]):
        with pytest.raises(ValueError, match="the index is for"):
            block_sparse_prefill(wrong, k_seq, v_seq, csr, index)
