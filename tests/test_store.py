"""KVStore against plain contiguous tensors: appends, page tables, both key layouts, summaries,
value means, fork / copy-on-write, free, the prefix cache, and the client's raw reads (fetch)."""

from __future__ import annotations

import pytest
import torch

L, HKV, D = 2, 2, 16


def _append(store, ref, sid, gen, random_kv, T, layer=None, token_ids=None, start=None):
    """Append T random positions to `sid` in the store and in the reference; returns (k, v)."""
    c = store.config
    shape = (T, c.num_kv_heads, c.head_dim) if layer is not None else (c.num_layers, T, c.num_kv_heads, c.head_dim)
    k, v = random_kv(gen, shape, c.dtype)
    store.append(sid, k, v, layer=layer, start=start, token_ids=token_ids)
    ref.append(sid, k, v, layer=layer)
    return k, v


def _new_seq(store, ref, token_ids=None):
    sid = store.create(token_ids=token_ids).seq_id
    ref.add_sequence(sid)
    return sid


def _live_pages(store):
    """Distinct page ids held by live sequences (any layer)."""
    pages = set()
    ids = store.sequence_ids()
    for layer in range(store.config.num_layers):
        if ids:
            pages.update(store.page_table(ids, layer).indices.tolist())
    return pages


# ---- empty sequences and the CSR page table --------------------------------------------------


def test_new_sequence_is_empty_in_every_layer(make_client):
    store = make_client(num_layers=3).store
    info = store.create()
    assert info.lengths == (0, 0, 0) and info.length == 0
    assert info.num_pages == 0 and info.cached_tokens == 0
    csr = store.page_table([info.seq_id], 1)
    assert csr.indptr.tolist() == [0, 0]
    assert csr.indices.numel() == 0
    assert csr.last_page_len.tolist() == [0]
    assert csr.seq_lens().tolist() == [0]


def test_sequence_ids_are_distinct_and_listed_while_live(make_client):
    store = make_client().store
    ids = [store.create().seq_id for _ in range(5)]
    assert len(set(ids)) == 5
    assert sorted(store.sequence_ids()) == sorted(ids)
    store.free(ids[2])
    assert ids[2] not in store.sequence_ids()


def test_page_table_lists_pages_in_position_order_with_the_last_page_fill(make_client, random_kv):
    store = make_client(page_size=4).store
    gen = torch.Generator().manual_seed(0)
    a, b = store.create().seq_id, store.create().seq_id
    store.append(a, *random_kv(gen, (L, 10, HKV, D)))
    store.append(b, *random_kv(gen, (L, 4, HKV, D)))
    store.append(a, *random_kv(gen, (L, 3, HKV, D)))
    csr = store.page_table([a, b], 0)
    # Low page ids are handed out first: a got 0,1,2, b got 3, a's fourth page is 4.
    assert csr.indptr.tolist() == [0, 4, 5]
    assert csr.indices.tolist() == [0, 1, 2, 4, 3]
    assert csr.last_page_len.tolist() == [1, 4]
    assert csr.seq_lens().tolist() == [13, 4]
    assert csr.page_size == 4 and csr.batch_size == 2


def test_page_table_of_one_layer_covers_only_the_positions_that_layer_holds(make_client, random_kv):
    store = make_client(page_size=4).store
    gen = torch.Generator().manual_seed(1)
    sid = store.create().seq_id
    store.append(sid, *random_kv(gen, (9, HKV, D)), layer=0)
    store.append(sid, *random_kv(gen, (3, HKV, D)), layer=1)
    info = store.describe(sid)
    assert info.lengths == (9, 3) and info.length == 3 and info.num_pages == 3
    assert store.page_table([sid], 0).last_page_len.tolist() == [1]
    csr1 = store.page_table([sid], 1)
    assert csr1.indptr.tolist() == [0, 1] and csr1.last_page_len.tolist() == [3]


def test_append_returns_the_updated_sequence_info(make_client, random_kv):
    store = make_client(page_size=4).store
    gen = torch.Generator().manual_seed(2)
    sid = store.create().seq_id
    info = store.append(sid, *random_kv(gen, (L, 6, HKV, D)), start=0)
    assert info.seq_id == sid and info.lengths == (6, 6) and info.num_pages == 2
    assert store.describe(sid) == info


# ---- random appends against contiguous tensors -------------------------------------------------


@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_interleaved_appends_of_all_layers_match_contiguous_tensors(
    make_client, random_kv, contiguous, assert_store_matches, page_size, num_kv_heads
):
    store = make_client(num_kv_heads=num_kv_heads, page_size=page_size).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(10 + page_size + num_kv_heads)
    ids = [_new_seq(store, ref) for _ in range(3)]
    for step in range(14):
        sid = ids[int(torch.randint(0, len(ids), (), generator=gen))]
        T = int(torch.randint(1, 2 * page_size + 4, (), generator=gen))
        start = ref.length(sid, 0) if step % 2 else None  # `start` is optional; when given it is the length
        _append(store, ref, sid, gen, random_kv, T, start=start)
        assert_store_matches(store, ref)
    # Long enough to cross many page boundaries (and outgrow the table's initial capacity).
    assert max(ref.length(s, 0) for s in ids) > 2 * page_size


@pytest.mark.parametrize("page_size", [4, 8])
def test_interleaved_appends_of_one_layer_match_contiguous_tensors(
    make_client, random_kv, contiguous, assert_store_matches, page_size
):
    store = make_client(num_layers=3, page_size=page_size).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(20 + page_size)
    ids = [_new_seq(store, ref) for _ in range(3)]
    for _ in range(24):
        sid = ids[int(torch.randint(0, len(ids), (), generator=gen))]
        layer = int(torch.randint(0, 3, (), generator=gen))
        T = int(torch.randint(1, 2 * page_size + 2, (), generator=gen))
        _append(store, ref, sid, gen, random_kv, T, layer=layer, start=ref.length(sid, layer))
        assert_store_matches(store, ref)
        assert store.describe(sid).lengths == tuple(ref.length(sid, each_layer) for each_layer in range(3))


def test_long_sequence_outgrows_the_page_table_buffer(make_client, random_kv, contiguous, assert_store_matches):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(3)
    sid = _new_seq(store, ref)
    for T in (30, 1, 45, 7, 60):  # 143 positions = 36 pages
        _append(store, ref, sid, gen, random_kv, T)
    assert store.describe(sid).num_pages == 36
    assert_store_matches(store, ref)


@pytest.mark.parametrize("page_size", [4, 8])
def test_random_mix_of_creates_appends_forks_and_frees_matches_contiguous_tensors(
    make_client, random_kv, contiguous, assert_store_matches, page_size
):
    store = make_client(page_size=page_size, device_pages=512).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(30 + page_size)
    ids = [_new_seq(store, ref)]
    for _ in range(40):
        op = int(torch.randint(0, 10, (), generator=gen))
        sid = ids[int(torch.randint(0, len(ids), (), generator=gen))]
        if op == 0 and len(ids) < 6:
            ids.append(_new_seq(store, ref))
        elif op == 1 and len(ids) < 6:
            child = store.fork(sid).seq_id
            ref.fork(sid, child)
            ids.append(child)
        elif op == 2 and len(ids) > 1:
            store.free(sid)
            ref.drop(sid)
            ids.remove(sid)
        else:
            T = int(torch.randint(1, 2 * page_size + 2, (), generator=gen))
            _append(store, ref, sid, gen, random_kv, T)
        assert_store_matches(store, ref)
        usage = store.pool_usage()
        assert usage["sequences"] == len(ids)
        assert usage["pages_free"] == usage["pages_total"] - len(_live_pages(store))


# ---- both key layouts, summaries, value means --------------------------------------------------


@pytest.mark.parametrize("page_size", [4, 16])
def test_dim_major_keys_are_the_transpose_of_sequence_major_keys_on_written_slots(make_client, random_kv, page_size):
    store = make_client(page_size=page_size).store
    gen = torch.Generator().manual_seed(4)
    sid = store.create().seq_id
    for T in (3, page_size + 2, 2 * page_size - 1):
        store.append(sid, *random_kv(gen, (L, T, HKV, D)))
    S = store.describe(sid).length
    pool = store.pool
    for layer in range(L):
        pages = store.page_table([sid], layer).indices.long()
        for i, page in enumerate(pages.tolist()):
            fill = min(page_size, S - i * page_size)
            k_seq = pool.k_seq[layer, page, :, :fill]  # [Hkv, fill, d]
            k_dim = pool.k_dim[layer, page, :, :, :fill]  # [Hkv, d, fill]
            torch.testing.assert_close(k_dim, k_seq.transpose(-1, -2), rtol=0, atol=0)


def test_summaries_of_a_partly_filled_last_page_cover_only_its_filled_rows(
    make_client, random_kv, gather, expected_summaries
):
    store = make_client(page_size=8).store
    gen = torch.Generator().manual_seed(5)
    sid = store.create().seq_id
    k, v = random_kv(gen, (L, 11, HKV, D))
    store.append(sid, k, v)
    for layer in range(L):
        (g,) = gather(store, [sid], layer)
        assert g.last_page_len == 3
        exp = expected_summaries(k[layer], 8)
        assert g.summaries.shape == (2, HKV, 3, D) and g.summaries.dtype == torch.float32
        torch.testing.assert_close(g.summaries[1, :, 0], k[layer, 8:].amin(0), rtol=0, atol=0)  # min
        torch.testing.assert_close(g.summaries[1, :, 1], k[layer, 8:].amax(0), rtol=0, atol=0)  # max
        torch.testing.assert_close(g.summaries[1, :, 2], k[layer, 8:].mean(0), rtol=1e-6, atol=1e-6)  # mean
        torch.testing.assert_close(g.summaries, exp, rtol=1e-6, atol=1e-6)


def test_summaries_are_refreshed_as_a_page_fills_one_row_at_a_time(
    make_client, random_kv, gather, expected_summaries
):
    store = make_client(page_size=4).store
    gen = torch.Generator().manual_seed(6)
    sid = store.create().seq_id
    rows = []
    for _ in range(9):
        k, v = random_kv(gen, (L, 1, HKV, D))
        store.append(sid, k, v)
        rows.append(k)
        keys = torch.cat(rows, dim=1)
        for layer in range(L):
            (g,) = gather(store, [sid], layer)
            torch.testing.assert_close(g.summaries, expected_summaries(keys[layer], 4), rtol=1e-6, atol=1e-6)


def test_summaries_ignore_stale_rows_left_in_a_reused_page(make_client, random_kv, gather, expected_summaries):
    store = make_client(page_size=8, device_pages=4).store
    gen = torch.Generator().manual_seed(7)
    old = store.create().seq_id
    k_old, v_old = random_kv(gen, (L, 32, HKV, D))
    store.append(old, k_old * 100, v_old * 100)  # large stale values in every page
    store.free(old)
    sid = store.create().seq_id
    k, v = random_kv(gen, (L, 3, HKV, D))
    store.append(sid, k, v)  # reuses a page: rows 3..7 still hold the old sequence's keys
    for layer in range(L):
        (g,) = gather(store, [sid], layer)
        torch.testing.assert_close(g.summaries, expected_summaries(k[layer], 8), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(store.value_mean([sid], layer)[0], v[layer].mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_value_mean_is_the_float32_mean_of_all_appended_values(make_client, random_kv, dtype):
    store = make_client(page_size=4, dtype=dtype).store
    gen = torch.Generator().manual_seed(8)
    a, b = store.create().seq_id, store.create().seq_id
    va, vb = [], []
    for T in (5, 1, 9):
        k, v = random_kv(gen, (L, T, HKV, D), dtype)
        store.append(a, k, v)
        va.append(v)
        k, v = random_kv(gen, (L, T + 2, HKV, D), dtype)
        store.append(b, k, v)
        vb.append(v)
    for layer in range(L):
        mean = store.value_mean([a, b], layer)
        assert mean.shape == (2, HKV, D) and mean.dtype == torch.float32
        expect = torch.stack([torch.cat(va, 1)[layer].float().mean(0), torch.cat(vb, 1)[layer].float().mean(0)])
        torch.testing.assert_close(mean, expect, rtol=1e-5, atol=1e-6)


def test_value_mean_of_one_layer_counts_only_that_layers_positions(make_client, random_kv):
    store = make_client(page_size=4).store
    gen = torch.Generator().manual_seed(9)
    sid = store.create().seq_id
    k0, v0 = random_kv(gen, (7, HKV, D))
    k1, v1 = random_kv(gen, (2, HKV, D))
    store.append(sid, k0, v0, layer=0)
    store.append(sid, k1, v1, layer=1)
    torch.testing.assert_close(store.value_mean([sid], 0)[0], v0.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(store.value_mean([sid], 1)[0], v1.mean(0), rtol=1e-6, atol=1e-6)


# ---- fork and copy-on-write --------------------------------------------------------------------


def test_fork_child_starts_with_the_parent_rows_lengths_and_pages(
    make_client, random_kv, contiguous, assert_store_matches
):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(11)
    parent = _new_seq(store, ref)
    _append(store, ref, parent, gen, random_kv, 10)
    free_before = store.pool_usage()["pages_free"]
    child = store.fork(parent)
    ref.fork(parent, child.seq_id)
    assert child.seq_id != parent
    assert child.lengths == (10, 10) and child.num_pages == 3 and child.cached_tokens == 0
    assert store.page_table([child.seq_id], 0).indices.tolist() == store.page_table([parent], 0).indices.tolist()
    assert store.pool_usage()["pages_free"] == free_before  # a fork allocates nothing
    assert store.allocator.refcount[[0, 1, 2]].tolist() == [2, 2, 2]
    assert_store_matches(store, ref)


def test_fork_shares_full_pages_and_copies_the_partial_one(make_client, random_kv, contiguous, assert_store_matches):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(12)
    parent = _new_seq(store, ref)
    _append(store, ref, parent, gen, random_kv, 10)  # pages 0, 1 full; page 2 holds 2 rows
    child = store.fork(parent).seq_id
    ref.fork(parent, child)
    free_before = store.pool_usage()["pages_free"]
    _append(store, ref, child, gen, random_kv, 1)  # writes into the shared partial page
    child_pages = store.page_table([child], 0).indices.tolist()
    assert store.page_table([parent], 0).indices.tolist() == [0, 1, 2]
    assert child_pages[:2] == [0, 1] and child_pages[2] not in (0, 1, 2)
    rc = store.allocator.refcount
    assert rc[[0, 1]].tolist() == [2, 2]  # full pages stay shared
    assert int(rc[2]) == 1 and int(rc[child_pages[2]]) == 1
    assert store.pool_usage()["pages_free"] == free_before - 1  # exactly one page copied
    assert_store_matches(store, ref)  # parent unchanged; child = parent's rows + its new row


def test_parent_writing_first_after_a_fork_gets_the_copy_and_the_child_keeps_the_page(
    make_client, random_kv, contiguous, assert_store_matches
):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(13)
    parent = _new_seq(store, ref)
    _append(store, ref, parent, gen, random_kv, 6)
    child = store.fork(parent).seq_id
    ref.fork(parent, child)
    _append(store, ref, parent, gen, random_kv, 5)  # fills the shared page 1 and opens a new one
    parent_pages = store.page_table([parent], 0).indices.tolist()
    assert store.page_table([child], 0).indices.tolist() == [0, 1]
    assert parent_pages[0] == 0 and parent_pages[1] not in (0, 1)
    assert store.allocator.refcount[[0, 1]].tolist() == [2, 1]
    assert_store_matches(store, ref)


def test_fork_of_a_sequence_with_a_full_last_page_copies_nothing(
    make_client, random_kv, contiguous, assert_store_matches
):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(14)
    parent = _new_seq(store, ref)
    _append(store, ref, parent, gen, random_kv, 8)
    child = store.fork(parent).seq_id
    ref.fork(parent, child)
    free_before = store.pool_usage()["pages_free"]
    _append(store, ref, child, gen, random_kv, 3)
    assert store.pool_usage()["pages_free"] == free_before - 1  # one new page, no copy
    assert store.page_table([child], 0).indices.tolist()[:2] == [0, 1]
    assert store.allocator.refcount[[0, 1]].tolist() == [2, 2]
    assert_store_matches(store, ref)


def test_copy_on_write_in_one_layer_form_keeps_every_layer_of_both_sequences_exact(
    make_client, random_kv, contiguous, assert_store_matches
):
    store = make_client(num_layers=3, page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(15)
    parent = _new_seq(store, ref)
    for layer, T in ((0, 7), (1, 5), (2, 6)):
        _append(store, ref, parent, gen, random_kv, T, layer=layer)
    child = store.fork(parent).seq_id
    ref.fork(parent, child)
    # Writing layer 1 of the child copies the shared page 1 in every layer.
    _append(store, ref, child, gen, random_kv, 2, layer=1, start=5)
    assert_store_matches(store, ref)
    _append(store, ref, child, gen, random_kv, 1, layer=0, start=7)  # page 1 is now private: no copy
    _append(store, ref, parent, gen, random_kv, 3, layer=2, start=6)
    assert_store_matches(store, ref)


@pytest.mark.parametrize("page_size", [4, 16])
def test_forked_sequences_continue_independently(
    make_client, random_kv, contiguous, assert_store_matches, page_size
):
    store = make_client(page_size=page_size).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(16)
    parent = _new_seq(store, ref)
    _append(store, ref, parent, gen, random_kv, page_size + 3)
    children = []
    for _ in range(2):
        child = store.fork(parent).seq_id
        ref.fork(parent, child)
        children.append(child)
    for step in range(8):
        sid = [parent, *children][step % 3]
        _append(store, ref, sid, gen, random_kv, int(torch.randint(1, page_size + 3, (), generator=gen)))
        assert_store_matches(store, ref)


def test_fork_of_a_fork_shares_the_common_prefix_three_ways(make_client, random_kv, contiguous, assert_store_matches):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(17)
    a = _new_seq(store, ref)
    _append(store, ref, a, gen, random_kv, 9)
    b = store.fork(a).seq_id
    ref.fork(a, b)
    c = store.fork(b).seq_id
    ref.fork(b, c)
    assert store.allocator.refcount[[0, 1, 2]].tolist() == [3, 3, 3]
    for sid in (c, a, b):
        _append(store, ref, sid, gen, random_kv, 2)
    assert store.allocator.refcount[[0, 1]].tolist() == [3, 3]
    assert_store_matches(store, ref)


# ---- free --------------------------------------------------------------------------------------


def test_free_returns_pages_to_the_free_list(make_client, random_kv):
    store = make_client(page_size=4, device_pages=16).store
    gen = torch.Generator().manual_seed(18)
    assert store.pool_usage() == {"pages_total": 16, "pages_free": 16, "pages_cached": 0, "sequences": 0,
                                  "sequences_expired": 0}
    a, b = store.create().seq_id, store.create().seq_id
    store.append(a, *random_kv(gen, (L, 10, HKV, D)))
    store.append(b, *random_kv(gen, (L, 5, HKV, D)))
    assert store.pool_usage() == {"pages_total": 16, "pages_free": 11, "pages_cached": 0, "sequences": 2,
                                  "sequences_expired": 0}
    store.free(a)
    assert store.pool_usage() == {"pages_total": 16, "pages_free": 14, "pages_cached": 0, "sequences": 1,
                                  "sequences_expired": 0}
    assert store.allocator.refcount[[0, 1, 2]].tolist() == [0, 0, 0]
    store.free(b)
    assert store.pool_usage()["pages_free"] == 16
    assert int(store.allocator.refcount.sum()) == 0


def test_freed_pages_are_handed_out_again(make_client, random_kv, contiguous, assert_store_matches):
    store = make_client(page_size=4, device_pages=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(19)
    a = _new_seq(store, ref)
    _append(store, ref, a, gen, random_kv, 16)  # the whole pool
    store.free(a)
    ref.drop(a)
    b = _new_seq(store, ref)
    _append(store, ref, b, gen, random_kv, 15)
    assert sorted(store.page_table([b], 0).indices.tolist()) == [0, 1, 2, 3]
    assert_store_matches(store, ref)


def test_freeing_one_side_of_a_fork_keeps_the_shared_pages_for_the_other(
    make_client, random_kv, contiguous, assert_store_matches
):
    store = make_client(page_size=4, device_pages=16).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(20)
    parent = _new_seq(store, ref)
    _append(store, ref, parent, gen, random_kv, 10)
    child = store.fork(parent).seq_id
    ref.fork(parent, child)
    _append(store, ref, child, gen, random_kv, 3)  # child: pages 0, 1 shared, a copy of 2, a new one
    store.free(parent)
    ref.drop(parent)
    assert store.allocator.refcount[[0, 1, 2]].tolist() == [1, 1, 0]
    assert store.pool_usage()["pages_free"] == 16 - 4
    assert_store_matches(store, ref)
    store.free(child)
    assert store.pool_usage()["pages_free"] == 16


# ---- prefix reuse ------------------------------------------------------------------------------


def _prompt(gen, n):
    return torch.randint(0, 50_000, (n,), generator=gen).tolist()


def _first_with_prompt(store, ref, gen, random_kv, prompt, create_with_ids=True):
    """A sequence whose prompt KV was appended with its token ids (so its full pages get hashed)."""
    sid = _new_seq(store, ref, token_ids=prompt if create_with_ids else None)
    _append(store, ref, sid, gen, random_kv, len(prompt), token_ids=prompt)
    return sid


@pytest.mark.parametrize("create_with_ids", [True, False])
def test_full_pages_of_a_prompt_are_registered_in_the_prefix_cache(make_client, random_kv, contiguous, create_with_ids):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(21)
    _first_with_prompt(store, ref, gen, random_kv, _prompt(gen, 11), create_with_ids)
    assert store.pool_usage()["pages_cached"] == 2  # 2 full pages; the partial one is not hashed


@pytest.mark.parametrize("page_size", [4, 8])
def test_second_sequence_with_the_same_prompt_reuses_its_full_pages(
    make_client, random_kv, contiguous, assert_store_matches, gather, page_size
):
    store = make_client(page_size=page_size).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(22)
    prompt = _prompt(gen, 3 * page_size + 1)
    first = _first_with_prompt(store, ref, gen, random_kv, prompt)
    free_before = store.pool_usage()["pages_free"]

    info = store.create(token_ids=prompt)
    cached = info.cached_tokens
    assert cached == 3 * page_size  # (len - 1) // P = 3 full pages
    assert info.lengths == (cached, cached) and info.num_pages == 3
    assert store.pool_usage()["pages_free"] == free_before  # nothing allocated for the reused pages
    first_pages = store.page_table([first], 0).indices.tolist()
    second_pages = store.page_table([info.seq_id], 0).indices.tolist()
    assert second_pages == first_pages[:3]
    assert store.allocator.refcount[first_pages[:3]].tolist() == [2, 2, 2]
    for layer in range(L):
        (g,) = gather(store, [info.seq_id], layer)
        torch.testing.assert_close(g.k, ref.k[first][layer][:cached], rtol=0, atol=0)
        torch.testing.assert_close(g.v, ref.v[first][layer][:cached], rtol=0, atol=0)
        torch.testing.assert_close(
            store.value_mean([info.seq_id], layer)[0], ref.v[first][layer][:cached].mean(0), rtol=1e-6, atol=1e-6
        )
    assert_store_matches(store, ref, [first])


def test_prefix_reuse_leaves_at_least_one_position_to_compute(make_client, random_kv, contiguous):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(23)
    prompt = _prompt(gen, 12)  # exactly 3 full pages, all hashed
    _first_with_prompt(store, ref, gen, random_kv, prompt)
    assert store.pool_usage()["pages_cached"] == 3
    assert store.create(token_ids=prompt).cached_tokens == 8  # (12 - 1) // 4 = 2 pages
    assert store.create(token_ids=prompt + [7]).cached_tokens == 12
    assert store.create(token_ids=prompt[:4]).cached_tokens == 0  # (4 - 1) // 4 = 0


def test_prefix_reuse_stops_at_the_first_page_that_differs(make_client, random_kv, contiguous):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(24)
    prompt = _prompt(gen, 13)
    first = _first_with_prompt(store, ref, gen, random_kv, prompt)
    other = list(prompt)
    other[5] += 1  # second page differs
    info = store.create(token_ids=other)
    assert info.cached_tokens == 4
    assert store.page_table([info.seq_id], 0).indices.tolist() == store.page_table([first], 0).indices.tolist()[:1]


def test_prompt_differing_in_an_early_token_gets_no_reuse(make_client, random_kv, contiguous):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(25)
    prompt = _prompt(gen, 13)
    _first_with_prompt(store, ref, gen, random_kv, prompt)
    other = [prompt[0] + 1] + prompt[1:]  # pages 1 and 2 hold the same tokens, but the hash is chained
    free_before = store.pool_usage()["pages_free"]
    info = store.create(token_ids=other)
    assert info.cached_tokens == 0 and info.num_pages == 0 and info.lengths == (0, 0)
    assert store.pool_usage()["pages_free"] == free_before


def test_sequence_with_a_reused_prefix_continues_on_its_own_pages(
    make_client, random_kv, contiguous, assert_store_matches
):
    store = make_client(page_size=4).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(26)
    prompt = _prompt(gen, 10)
    first = _first_with_prompt(store, ref, gen, random_kv, prompt)
    second = store.create(token_ids=prompt).seq_id
    assert store.describe(second).cached_tokens == 8
    ref.fork(first, second)
    ref.k[second] = [t[:8] for t in ref.k[second]]
    ref.v[second] = [t[:8] for t in ref.v[second]]
    _append(store, ref, second, gen, random_kv, 2, start=8, token_ids=prompt[8:])  # the rest of the prompt
    _append(store, ref, second, gen, random_kv, 5)  # and generated tokens
    assert_store_matches(store, ref)
    pages_first = set(store.page_table([first], 0).indices.tolist())
    pages_second = store.page_table([second], 0).indices.tolist()
    assert set(pages_second[2:]).isdisjoint(pages_first)


def test_pages_of_a_freed_sequence_stay_reusable_by_hash(make_client, random_kv, contiguous, gather):
    store = make_client(page_size=4, device_pages=16).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(27)
    prompt = _prompt(gen, 11)
    first = _first_with_prompt(store, ref, gen, random_kv, prompt)
    pages = store.page_table([first], 0).indices.tolist()
    store.free(first)
    assert store.pool_usage() == {"pages_total": 16, "pages_free": 16, "pages_cached": 2, "sequences": 0,
                                  "sequences_expired": 0}
    info = store.create(token_ids=prompt)
    assert info.cached_tokens == 8
    assert store.page_table([info.seq_id], 0).indices.tolist() == pages[:2]
    assert store.allocator.refcount[pages[:2]].tolist() == [1, 1]
    assert store.pool_usage()["pages_free"] == 14
    for layer in range(L):
        (g,) = gather(store, [info.seq_id], layer)
        torch.testing.assert_close(g.k, ref.k[first][layer][:8], rtol=0, atol=0)
        torch.testing.assert_close(
            store.value_mean([info.seq_id], layer)[0], ref.v[first][layer][:8].mean(0), rtol=1e-6, atol=1e-6
        )


def test_cached_pages_are_evicted_only_when_the_pool_needs_them(
    make_client, random_kv, contiguous, assert_store_matches
):
    P, N = 4, 8
    store = make_client(page_size=P, device_pages=N).store
    ref = contiguous(store.config)
    gen = torch.Generator().manual_seed(28)
    prompt = _prompt(gen, 10)
    first = _first_with_prompt(store, ref, gen, random_kv, prompt)  # pages 0, 1 hashed; 2 partial
    store.free(first)
    ref.drop(first)
    # Plain free pages go first: 6 of them, leaving both hashed pages matchable.
    other = _new_seq(store, ref)
    _append(store, ref, other, gen, random_kv, (N - 2) * P)
    assert store.pool_usage()["pages_cached"] == 2
    probe = store.create(token_ids=prompt)
    assert probe.cached_tokens == 8
    store.free(probe.seq_id)
    # Now the pool needs one more page: the least recently freed hashed page (page 0) is evicted.
    _append(store, ref, other, gen, random_kv, P)
    assert store.pool_usage()["pages_cached"] == 1
    assert store.create(token_ids=prompt).cached_tokens == 0  # the chain starts at the evicted page
    assert_store_matches(store, ref, [other])


# ---- raw reads through the client (fetch) ------------------------------------------------------


@pytest.fixture
def fetch_setup(make_client, random_kv):
    client = make_client(num_kv_heads=2, head_dim=16, page_size=4)
    gen = torch.Generator().manual_seed(29)
    sid = client.create().seq_id
    k, v = random_kv(gen, (L, 11, HKV, D))
    client.append(sid, k, v)
    other = client.create().seq_id
    client.append(other, *random_kv(gen, (L, 6, HKV, D)))
    return client, sid, k, v


def test_fetch_columns_returns_chosen_key_dims_of_every_position(fetch_setup, gather):
    client, sid, k, v = fetch_setup
    dims = torch.tensor([[3, 0, 15], [7, 7, 1]])
    res = client.fetch(sid, 1, "columns", dims)
    (cols,) = res.tensors
    assert cols.shape == (HKV, 3, 11)
    (g,) = gather(client.store, [sid], 1)
    k_seq_t = g.k.permute(1, 2, 0)  # [Hkv, d, S]: k_seq rows, transposed
    for h in range(HKV):
        torch.testing.assert_close(cols[h], k_seq_t[h, dims[h]], rtol=0, atol=0)
        torch.testing.assert_close(cols[h], k[1, :, h, dims[h]].T, rtol=0, atol=0)
    assert res.bytes_read == HKV * 3 * 11 * 4


def test_fetch_rows_returns_keys_and_values_at_chosen_positions(fetch_setup):
    client, sid, k, v = fetch_setup
    pos = torch.tensor([[0, 10, 4, 5], [3, 3, 9, 8]], dtype=torch.int32)
    res = client.fetch(sid, 0, "rows", pos)
    keys, values = res.tensors
    assert keys.shape == values.shape == (HKV, 4, D)
    for h in range(HKV):
        torch.testing.assert_close(keys[h], k[0, pos[h].long(), h], rtol=0, atol=0)
        torch.testing.assert_close(values[h], v[0, pos[h].long(), h], rtol=0, atol=0)
    assert res.bytes_read == 2 * HKV * 4 * D * 4


def test_fetch_value_mean_returns_the_float32_mean_per_kv_head(fetch_setup):
    client, sid, k, v = fetch_setup
    res = client.fetch(sid, 1, "value_mean")
    (mean,) = res.tensors
    assert mean.shape == (HKV, D) and mean.dtype == torch.float32
    torch.testing.assert_close(mean, v[1].mean(0), rtol=1e-6, atol=1e-6)
    assert res.bytes_read == HKV * D * 4


def test_fetch_summaries_returns_min_max_mean_of_each_page(fetch_setup, expected_summaries):
    client, sid, k, v = fetch_setup
    res = client.fetch(sid, 0, "summaries")
    (summ,) = res.tensors
    assert summ.shape == (3, HKV, 3, D) and summ.dtype == torch.float32
    torch.testing.assert_close(summ, expected_summaries(k[0], 4), rtol=1e-6, atol=1e-6)
    assert res.bytes_read == 3 * HKV * 3 * D * 4
