"""kvcache.kernels.sparse_prefill against the torch reference kvcache.prefill.minference and dense attention.

Each case checks three things agree: the Triton kernel (run with torch.empty poisoned, so an
output it never writes is NaN), the torch reference, and plain dense attention over K/V read
position by position through the page table with a mask built from the index's lists by loops.
Kernels run on the CPU under the Triton interpreter: blocks of 16, d=32, a few hundred positions.
"""

import math

import pytest
import torch
from kernel_support import HKV, INTERPRETED, NO_BF16_ON_CPU, TOL, assert_matches, poisoned_allocations, scattered_store

from kvcache.kernels.sparse_prefill import sparse_prefill
from kvcache.prefill.minference import minference_prefill
from kvcache.prefill.minference_index import (
    SparseIndex,
    a_shape_index,
    block_sparse_index,
    causal_index,
    vertical_slash_index,
)

D = 32
B = 16


class Result:
    def __init__(self, out, lse):
        self.out, self.lse = out, lse


def chunk(length, start, G, dtype, seed=1, device="cpu", page_size=8, extra=0):
    """A store whose one sequence holds `length + extra` positions on scattered pages, and a chunk
    q [length - start, HKV*G, D] at `start` (`extra` positions are cached after the chunk)."""
    store, (seq,) = scattered_store((length + extra,), d=D, page_size=page_size, dtype=dtype, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn((length - start, HKV * G, D), generator=gen).to(dtype).to(device)
    view = store.layer_view(0)
    return q, view.k_seq, view.v_seq, store.page_table([seq], 0)


def build(pattern, q, k_seq, csr, start):
    """An index of `pattern` with sizes small enough to skip blocks at these lengths."""
    if pattern == "causal":
        return causal_index(q, start, block_size=B)
    if pattern == "a_shape":
        return a_shape_index(q, start, n_init=12, n_local=40, block_size=B)
    if pattern == "vertical_slash":
        return vertical_slash_index(q, k_seq, csr, start, n_vertical=24, n_slash=20, first_columns=3,
                                    last_diagonals=8, min_columns=0, min_diagonals=0, block_size=B)
    return block_sparse_index(q, k_seq, csr, start, top_k=4, block_size=B)


def contiguous_kv(pool, csr, S):
    """Rows 0..S-1 of the sequence, read one position at a time through the page table -> [S, Hkv, d]."""
    pages = csr.indices.long()
    pos = torch.arange(S, device=pool.device)
    return pool[pages[pos // csr.page_size], :, pos % csr.page_size]


def loop_mask(index, head):
    """The (query, key) pairs the index allows for `head`, from its lists by plain loops [T, start+T]."""
    T, S, start = index.num_queries, index.num_keys, index.start
    mask = torch.zeros((T, S), dtype=torch.bool)
    for m in range(index.num_query_blocks):
        first_row = max((index.first_block + m) * B - start, 0)
        rows = slice(first_row, min((index.first_block + m + 1) * B - start, T))
        keys = []
        for i in range(int(index.block_count[head, m])):
            kb = int(index.block_index[head, m, i])
            keys.extend(range(kb * B, min((kb + 1) * B, S)))
        keys.extend(index.column_index[head, m, : int(index.column_count[head, m])].tolist())
        mask[rows, keys] = True
    causal = torch.arange(S)[None, :] <= start + torch.arange(T)[:, None]
    return mask & causal


def masked_dense(q, k_seq, v_seq, csr, index, scale=None):
    """Dense attention of q over the contiguous K/V with each head's loop_mask: Result(out, lse) in float32."""
    T, Hq, d = q.shape
    S = index.num_keys
    k = contiguous_kv(k_seq, csr, S).float().cpu()
    v = contiguous_kv(v_seq, csr, S).float().cpu()
    G = Hq // k.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out, lse = torch.zeros((T, Hq, d)), torch.zeros((T, Hq))
    for h in range(Hq):
        logits = (q[:, h].float().cpu() @ k[:, h // G].T) * scale
        logits[~loop_mask(index, h)] = float("-inf")
        lse[:, h] = torch.logsumexp(logits, dim=-1)
        out[:, h] = torch.softmax(logits, dim=-1) @ v[:, h // G]
    return Result(out, lse)


def run_kernel(q, k_seq, v_seq, csr, index, **kw):
    with poisoned_allocations():
        return sparse_prefill(q, k_seq, v_seq, csr, index, **kw)


def assert_all_agree(q, k_seq, v_seq, csr, index, dtype, **kw):
    out, lse = run_kernel(q, k_seq, v_seq, csr, index, **kw)
    ref = Result(*minference_prefill(q, k_seq, v_seq, csr, index, **kw))
    dense = masked_dense(q, k_seq, v_seq, csr, index, **kw)
    assert_matches(out, lse, ref, dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(ref.out.float().cpu(), dense.out, rtol=rtol, atol=atol)
    torch.testing.assert_close(ref.lse.cpu(), dense.lse, rtol=1e-5, atol=1e-5)


# (pattern, length, start, G, dtype): a cross-section, the interpreter being slow. Lengths are odd
# or leave a partial last block; starts are 0, block-aligned and mid-block.
CASES = [
    pytest.param("block_sparse", 157, 37, 1, torch.float32, id="block_sparse-S157-start37-G1-f32"),
    pytest.param("block_sparse", 118, 0, 4, torch.float16, id="block_sparse-S118-start0-G4-f16"),
    pytest.param("vertical_slash", 203, 32, 1, torch.float16, id="vertical_slash-S203-start32-G1-f16"),
    pytest.param("vertical_slash", 141, 75, 4, torch.float32, id="vertical_slash-S141-start75-G4-f32"),
    pytest.param("a_shape", 173, 0, 1, torch.float32, id="a_shape-S173-start0-G1-f32"),
    pytest.param("a_shape", 150, 90, 4, torch.float16, id="a_shape-S150-start90-G4-f16"),
]


@pytest.mark.parametrize("pattern, length, start, G, dtype", CASES)
def test_kernel_matches_the_reference_and_dense_attention_on_the_same_mask(pattern, length, start, G, dtype):
    q, k_seq, v_seq, csr = chunk(length, start, G, dtype)
    index = build(pattern, q, k_seq, csr, start)
    full = (index.block_count.sum() == sum(m + 1 for m in range(index.first_block, index.first_block
                                                                  + index.num_query_blocks)) * q.shape[1])
    assert not full, "the index should skip blocks, or the test checks dense attention only"
    assert_all_agree(q, k_seq, v_seq, csr, index, dtype)


def test_vertical_slash_cases_gather_columns_outside_their_blocks():
    for length, start, G in ((203, 32, 1), (141, 75, 4)):
        q, k_seq, _, csr = chunk(length, start, G, torch.float32)
        index = build("vertical_slash", q, k_seq, csr, start)
        assert index.has_columns and int(index.column_count.min()) == 0 and int(index.column_count.max()) > 4


@pytest.mark.parametrize(
    "length, start, G, dtype",
    [(150, 0, 1, torch.float32), (111, 53, 4, torch.float16), (96, 64, 4, torch.float32)],
    ids=["S150-start0-G1-f32", "S111-start53-G4-f16", "S96-start64-G4-f32"],
)
def test_a_full_causal_index_gives_dense_causal_attention(length, start, G, dtype):
    q, k_seq, v_seq, csr = chunk(length, start, G, dtype)
    index = causal_index(q, start, block_size=B)
    out, lse = run_kernel(q, k_seq, v_seq, csr, index)
    k = contiguous_kv(k_seq, csr, length).float()
    v = contiguous_kv(v_seq, csr, length).float()
    qg = q.float().view(q.shape[0], HKV, G, D)
    logits = torch.einsum("thgd,shd->hgts", qg, k) / math.sqrt(D)
    causal = torch.ones((q.shape[0], length), dtype=torch.bool).tril(start)
    logits = logits.masked_fill(~causal, float("-inf"))
    dense = Result(torch.einsum("hgts,shd->thgd", torch.softmax(logits, -1), v).reshape(q.shape),
                   torch.logsumexp(logits, -1).permute(2, 0, 1).reshape(q.shape[0], -1))
    assert_matches(out, lse, dense, dtype)


def test_blocks_left_out_of_the_index_are_never_read():
    # A chunk from position 48 with a sink block and no window: positions 16..47 (blocks 1 and 2)
    # are cached but in no list. Poisoned with NaN there, K/V must leave the output unchanged.
    q, k_seq, v_seq, csr = chunk(130, 48, 4, torch.float16)
    index = a_shape_index(q, 48, n_init=16, n_local=1, block_size=B)
    assert all(1 not in row and 2 not in row for row in index.block_index.flatten(0, 1).tolist())
    expected = masked_dense(q, k_seq, v_seq, csr, index)
    pos = torch.arange(16, 48)
    pages, slots = csr.pages_of(0)[pos // csr.page_size], pos % csr.page_size
    k_seq[pages, :, slots] = float("nan")
    v_seq[pages, :, slots] = float("nan")
    out, lse = run_kernel(q, k_seq, v_seq, csr, index)
    assert_matches(out, lse, expected, torch.float16)


def test_positions_cached_after_the_chunk_are_not_attended():
    q, k_seq, v_seq, csr = chunk(120, 40, 1, torch.float32, extra=37)
    assert csr.host_lens[0] == 157
    index = build("vertical_slash", q, k_seq, csr, 40)
    assert_all_agree(q, k_seq, v_seq, csr, index, torch.float32)


def test_pages_of_32_and_an_explicit_scale():
    q, k_seq, v_seq, csr = chunk(150, 20, 1, torch.float16, page_size=32)
    index = build("block_sparse", q, k_seq, csr, 20)
    assert_all_agree(q, k_seq, v_seq, csr, index, torch.float16, scale=0.3)


def test_hand_made_index_with_many_columns_and_a_query_block_with_none():
    # Query blocks 0..4 of a 75-query chunk; one head. Block 2 lists no block and no column: its
    # rows attend nothing (out 0, lse -inf); block 4 has 37 columns (three tiles, the last partial).
    T, Hq = 75, 2
    q, k_seq, v_seq, csr = chunk(T, 0, 1, torch.float32)
    nq = 5
    block_index = torch.full((Hq, nq, 2), -1, dtype=torch.int32)
    block_count = torch.zeros((Hq, nq), dtype=torch.int32)
    column_index = torch.full((Hq, nq, 37), -1, dtype=torch.int32)
    column_count = torch.zeros((Hq, nq), dtype=torch.int32)
    for h in range(Hq):
        for m, blocks in ((0, [0]), (1, [1]), (3, [1, 3]), (4, [1, 4])):
            block_index[h, m, : len(blocks)] = torch.tensor(blocks)
            block_count[h, m] = len(blocks)
        cols = torch.tensor([0, 2, 3, 5, 7, 11, 13] + list(range(33, 63)))[: 37 - h]
        column_index[h, 4, : cols.numel()] = cols
        column_count[h, 4] = cols.numel()
        column_index[h, 3, :3] = torch.tensor([4, 9, 40])
        column_count[h, 3] = 3
    index = SparseIndex(B, 0, T, block_index, block_count, column_index, column_count)
    out, lse = run_kernel(q, k_seq, v_seq, csr, index)
    empty = slice(2 * B, 3 * B)
    assert (out[empty] == 0).all() and lse[empty].isneginf().all()
    rest = torch.cat((torch.arange(0, 2 * B), torch.arange(3 * B, T)))
    dense = masked_dense(q, k_seq, v_seq, csr, index)
    assert_matches(out[rest], lse[rest], Result(dense.out[rest], dense.lse[rest]), torch.float32)


@pytest.mark.skipif(INTERPRETED, reason="bf16 needs compiled kernels: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_BF16_ON_CPU)
@pytest.mark.parametrize("pattern", ["causal", "vertical_slash", "block_sparse", "a_shape"])
def test_bfloat16_matches_the_reference_on_the_gpu(pattern):
    q, k_seq, v_seq, csr = chunk(203, 45, 4, torch.bfloat16, device="cuda")
    index = build(pattern, q, k_seq, csr, 45)
    out, lse = run_kernel(q, k_seq, v_seq, csr, index)
    assert_matches(out, lse, Result(*minference_prefill(q, k_seq, v_seq, csr, index)), torch.bfloat16)
