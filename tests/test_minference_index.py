"""MInference index builders (docs/sparse-attention.md §2) on crafted inputs with a known answer.

Keys are planted in a one-layer store whose page ids are interleaved with another sequence's,
so every builder reads them through the page table. Blocks of 16 keep the shapes tiny.
"""

import math

import pytest
import torch

from kvcache import KVCacheConfig, KVStore
from kvcache.errors import InvalidParameter, PositionOutOfRange
from kvcache.prefill.minference_index import (
    a_shape_index,
    block_sparse_index,
    causal_index,
    vertical_slash_index,
    vertical_slash_lines,
    vertical_slash_to_index,
)

B = 16  # block size of these tests


def store_with(k: torch.Tensor, v: torch.Tensor | None = None, page_size: int = 8):
    """A one-layer store holding k, v [S, Hkv, d] as one sequence, its pages interleaved with a filler's."""
    S, Hkv, d = k.shape
    v = torch.randn_like(k) if v is None else v
    store = KVStore(KVCacheConfig(num_layers=1, num_kv_heads=Hkv, head_dim=d, page_size=page_size,
                                  dtype=k.dtype, device="cpu", device_pages=2 * (S // page_size) + 8))
    seq, filler = store.create().seq_id, store.create().seq_id
    for s0 in range(0, S, 3 * page_size):
        s1 = min(S, s0 + 3 * page_size)
        store.append(seq, k[s0:s1], v[s0:s1], layer=0)
        store.append(filler, torch.zeros((page_size, Hkv, d), dtype=k.dtype),
                     torch.zeros((page_size, Hkv, d), dtype=k.dtype), layer=0)
    csr = store.page_table([seq], 0)
    assert (csr.indices[1:] - csr.indices[:-1] != 1).any(), "pages should not be contiguous"
    return store.layer_view(0).k_seq, csr


def lists(index, head: int):
    """{query block (absolute): (ascending key blocks, ascending columns)} of one head, as Python lists."""
    out = {}
    for m in range(index.num_query_blocks):
        nb, nc = int(index.block_count[head, m]), int(index.column_count[head, m])
        out[index.first_block + m] = (
            index.block_index[head, m, :nb].tolist(),
            index.column_index[head, m, :nc].tolist(),
        )
    return out


def unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, d), generator=gen)
    return x / x.norm(dim=-1, keepdim=True)


# ---- A-shape and causal --------------------------------------------------------------------------------


@pytest.mark.parametrize("start, T", [(0, 200), (40, 173), (7, 9)])
def test_a_shape_lists_exactly_the_sink_blocks_and_the_window_blocks(start, T):
    q = torch.zeros((T, 3, 16))
    index = a_shape_index(q, start, n_init=20, n_local=50, block_size=B)
    for M, (blocks, columns) in lists(index, 0).items():
        first_query = max(M * B, start)
        window = set(range(max(first_query - 49, 0) // B, M + 1))
        sink = {b for b in (0, 1) if b <= M}  # 20 sink keys fill blocks 0 and 1
        assert blocks == sorted(sink | window), M
        assert columns == []
    for h in range(1, 3):
        assert torch.equal(index.block_index[h], index.block_index[0])


def test_a_shape_covers_every_sink_and_window_key_of_every_query():
    start, T, n_init, n_local = 21, 150, 5, 33
    index = a_shape_index(torch.zeros((T, 1, 16)), start, n_init=n_init, n_local=n_local, block_size=B)
    mask = index.mask(0)
    for t in range(T):
        i = start + t
        named = [j for j in range(i + 1) if j < n_init or j > i - n_local]
        assert mask[t, named].all(), i


def test_causal_index_lists_every_block_up_to_the_diagonal():
    index = causal_index(torch.zeros((70, 2, 16)), 25, block_size=B)
    assert index.first_block == 1 and index.num_query_blocks == 5
    for M, (blocks, _) in lists(index, 1).items():
        assert blocks == list(range(M + 1))
    assert torch.equal(index.mask(0), torch.ones((70, 95), dtype=torch.bool).tril(25))


# ---- vertical-slash ------------------------------------------------------------------------------------


def seq_major(k: torch.Tensor) -> torch.Tensor:
    """[S, Hkv, d] -> [Hkv, S, d], as vertical_slash_lines takes keys."""
    return k.permute(1, 0, 2)


def planted_column_inputs(column: int, S: int = 300, d: int = 32, heads: int = 1, Hkv: int = 1, seed: int = 0):
    """Keys with one column every query attends to strongly (key `column` = 6 u, every query ~ u)."""
    gen = torch.Generator().manual_seed(seed)
    u = unit_vectors(1, d, seed + 1)[0]
    k = torch.randn((S, Hkv, d), generator=gen) * 0.5
    k[column] = 6 * u
    q = torch.randn((S, heads, d), generator=gen) * 0.5 + 3 * u
    return q, k


def test_vertical_slash_finds_a_planted_column():
    q, k = planted_column_inputs(column=211)
    columns, _ = vertical_slash_lines(q, seq_major(k), 0, n_vertical=3, n_slash=4, first_columns=2, last_diagonals=2,
                                      min_columns=0, min_diagonals=0)
    assert columns[0].tolist() == [0, 1, 211]


def test_a_planted_column_outside_the_listed_blocks_becomes_a_gathered_column():
    start, S = 96, 300
    q, k = planted_column_inputs(column=211, S=S)
    k_seq, csr = store_with(k)
    index = vertical_slash_index(q[start:], k_seq, csr, start, n_vertical=3, n_slash=4, first_columns=2,
                                 last_diagonals=4, min_columns=0, min_diagonals=0, block_size=B)
    for M, (blocks, columns) in lists(index, 0).items():
        assert blocks == [b for b in (M - 1, M) if b >= 0]  # diagonals 0..3 cross the diagonal block and the one before
        expected = [c for c in (0, 1, 211) if c // B <= M and c // B not in blocks]
        assert columns == expected, M
    mask = index.mask(0)
    assert mask[211 - start :, 211].all() and not mask[: 211 - start, 211].any()


def planted_diagonal_inputs(offset: int, S: int = 300, d: int = 32, seed: int = 0):
    """Query i aligned with key i - offset (random unit position codes), so diagonal `offset` dominates."""
    codes = unit_vectors(S, d, seed)
    k = (4 * codes)[:, None, :]
    q = torch.zeros((S, 1, d))
    q[offset:, 0] = 4 * codes[: S - offset]
    return q, k


def test_vertical_slash_finds_a_planted_diagonal():
    q, k = planted_diagonal_inputs(offset=70)
    _, offsets = vertical_slash_lines(q, seq_major(k), 0, n_vertical=1, n_slash=3, first_columns=1, last_diagonals=2,
                                      min_columns=0, min_diagonals=0)
    assert offsets[0].tolist() == [0, 1, 70]


def test_a_planted_diagonal_lists_the_two_blocks_it_crosses_in_every_query_block():
    start, S = 50, 300
    q, k = planted_diagonal_inputs(offset=70, S=S)
    k_seq, csr = store_with(k)
    index = vertical_slash_index(q[start:], k_seq, csr, start, n_vertical=1, n_slash=2, first_columns=1,
                                 last_diagonals=1, min_columns=0, min_diagonals=0, block_size=B)
    # Offset 70 = 4 * 16 + 6: rows M*16..M*16+15 reach back to keys in blocks M - 5 and M - 4.
    for M, (blocks, columns) in lists(index, 0).items():
        assert blocks == [b for b in (M - 5, M - 4, M) if b >= 0], M
        assert columns == ([0] if M >= 1 and M not in (4, 5) else []), M  # column 0 unless block 0 is listed


def test_first_columns_and_nearest_diagonals_are_kept_even_when_they_score_nothing():
    q, k = planted_diagonal_inputs(offset=70)
    k[:3] = -4 * q[-64:, 0].mean(dim=0)  # the first keys repel the queries the estimate uses
    columns, offsets = vertical_slash_lines(q, seq_major(k), 0, n_vertical=4, n_slash=3, first_columns=3,
                                            last_diagonals=3, min_columns=0, min_diagonals=0)
    assert columns[0, :3].tolist() == [0, 1, 2]
    assert offsets[0].tolist() == [0, 1, 2]  # the planted 70 loses to the forced diagonals


def test_forced_lines_beyond_the_budget_keep_the_earliest_columns_and_nearest_diagonals():
    q, k = planted_diagonal_inputs(offset=70)
    columns, offsets = vertical_slash_lines(q, seq_major(k), 0, n_vertical=2, n_slash=3, first_columns=30,
                                            last_diagonals=100, min_columns=0, min_diagonals=0)
    assert columns[0].tolist() == [0, 1] and offsets[0].tolist() == [0, 1, 2]


def test_the_minimum_counts_of_columns_and_diagonals_apply():
    q, k = planted_diagonal_inputs(offset=70)
    columns, offsets = vertical_slash_lines(q, seq_major(k), 0, n_vertical=1, n_slash=1)
    assert columns.shape == (1, 30) and offsets.shape == (1, 50)


def test_vertical_slash_scores_match_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    T, start, Hkv, G, d = 90, 40, 2, 2, 16
    q = torch.randn((T, Hkv * G, d), generator=gen)
    k = torch.randn((start + T, Hkv, d), generator=gen)
    n_last = 64
    columns, offsets = vertical_slash_lines(q, seq_major(k), start, n_vertical=7, n_slash=9, last_q=n_last,
                                            first_columns=0, last_diagonals=0, min_columns=0, min_diagonals=0)
    S = start + T
    for h in range(Hkv * G):
        vertical, slash = torch.zeros(S), torch.zeros(S)
        for r in range(n_last):
            i = S - n_last + r
            a = torch.softmax(k[: i + 1, h // G] @ q[T - n_last + r, h] / math.sqrt(d), dim=0)
            vertical[: i + 1] += a
            for j in range(i + 1):
                slash[i - j] += a[j]
        assert columns[h].tolist() == sorted(torch.topk(vertical, 7).indices.tolist())
        assert offsets[h].tolist() == sorted(torch.topk(slash, 9).indices.tolist())


def test_indices_are_per_query_head():
    q, k = planted_column_inputs(column=150, heads=4, Hkv=2)
    q[:, 1] = -q[:, 1]  # head 1 (kv head 0) is repelled by the planted column
    k[150, 1] = k[149, 1]  # kv head 1 holds no planted column
    columns, _ = vertical_slash_lines(q, seq_major(k), 0, n_vertical=1, n_slash=1, first_columns=0, last_diagonals=0,
                                      min_columns=0, min_diagonals=0)
    found = [150 in columns[h].tolist() for h in range(4)]
    assert found == [True, False, False, False]


def test_the_index_reads_keys_through_the_page_table():
    gen = torch.Generator().manual_seed(4)
    start, T = 37, 120
    k = torch.randn((start + T, 2, 16), generator=gen)
    q = torch.randn((T, 4, 16), generator=gen)
    k_seq, csr = store_with(k)
    params = {"n_vertical": 5, "n_slash": 6, "first_columns": 1, "last_diagonals": 2, "min_columns": 0,
              "min_diagonals": 0}
    index = vertical_slash_index(q, k_seq, csr, start, block_size=B, **params)
    expected = vertical_slash_to_index(*vertical_slash_lines(q, seq_major(k), start, **params), start, T, B)
    for name in ("block_index", "block_count", "column_index", "column_count"):
        assert torch.equal(getattr(index, name), getattr(expected, name)), name


def test_positions_cached_after_the_chunk_do_not_change_its_index():
    gen = torch.Generator().manual_seed(5)
    start, T = 40, 100
    k = torch.randn((start + T + 60, 1, 16), generator=gen)
    q = torch.randn((T, 2, 16), generator=gen)
    params = {"n_vertical": 5, "n_slash": 6, "first_columns": 1, "last_diagonals": 2, "min_columns": 0,
              "min_diagonals": 0, "block_size": B}
    longer = vertical_slash_index(q, *store_with(k), start, **params)
    exact = vertical_slash_index(q, *store_with(k[: start + T]), start, **params)
    for name in ("block_index", "block_count", "column_index", "column_count"):
        assert torch.equal(getattr(longer, name), getattr(exact, name)), name


@pytest.mark.parametrize("start, T", [(0, 128), (21, 150)])
def test_columns_in_listed_blocks_or_after_the_query_block_are_dropped(start, T):
    offsets = torch.tensor([[0, 40, 41]])  # 40 and 41 cross blocks 2 and 3 back from the diagonal
    columns = torch.tensor([[5, 20, 50, 100, 130, 170]])
    index = vertical_slash_to_index(columns, offsets, start, T, B)
    for M, (blocks, cols) in lists(index, 0).items():
        assert blocks == [b for b in (M - 3, M - 2, M) if b >= 0], M
        assert cols == [c for c in columns[0].tolist() if c // B <= M and c // B not in blocks], M


# ---- block-sparse --------------------------------------------------------------------------------------


def planted_block_inputs(block: int, S: int = 260, d: int = 32, seed: int = 0):
    """Every key of block `block` aligned with a direction u that every query leans towards."""
    gen = torch.Generator().manual_seed(seed)
    u = unit_vectors(1, d, seed + 1)[0]
    k = torch.randn((S, 1, d), generator=gen)
    k[block * B : (block + 1) * B, 0] += 4 * u
    q = torch.randn((S, 2, d), generator=gen) + 2 * u
    return q, k


@pytest.mark.parametrize("start", [0, 35])
def test_block_sparse_finds_a_planted_strong_block(start):
    q, k = planted_block_inputs(block=6)
    k_seq, csr = store_with(k)
    index = block_sparse_index(q[start:], k_seq, csr, start, top_k=3, block_size=B)
    for h in range(2):
        for M, (blocks, _) in lists(index, h).items():
            assert len(blocks) == min(3, M + 1) and blocks == sorted(blocks)
            assert blocks[0] == 0 and blocks[-1] == M  # first and diagonal always in
            if M > 6:
                assert blocks == [0, 6, M], (h, M)


def test_block_sparse_keeps_the_first_and_diagonal_blocks_against_higher_scores():
    q, k = planted_block_inputs(block=6)
    k[:B] -= 8 * q[:, 0].mean(dim=0)  # block 0 repels every query
    k_seq, csr = store_with(k)
    index = block_sparse_index(q, k_seq, csr, 0, top_k=2, block_size=B)
    for M, (blocks, _) in lists(index, 0).items():
        assert blocks == sorted({0, M}), M


# ---- errors --------------------------------------------------------------------------------------------


def test_a_chunk_beyond_the_cached_positions_is_refused():
    k = torch.randn((50, 1, 16))
    k_seq, csr = store_with(k)
    with pytest.raises(PositionOutOfRange):
        block_sparse_index(torch.randn((20, 1, 16)), k_seq, csr, 40, block_size=B)


def test_block_sparse_top_k_below_two_is_refused():
    k = torch.randn((50, 1, 16))
    k_seq, csr = store_with(k)
    with pytest.raises(InvalidParameter):
        block_sparse_index(torch.randn((50, 1, 16)), k_seq, csr, 0, top_k=1, block_size=B)
