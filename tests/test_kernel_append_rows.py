"""kvcache.kernels.append_rows against its torch reference (PagePool.append_rows and value_sum += v), and the store's
decode append.

Random pools are written by both, a step at a time, with rows that start pages (row 0), fill their
last row, and sit at device slots other than their page ids (as in a tiered store); every pool
tensor must match afterwards, including the ones no row touched.
"""

import pytest
import torch
from kernel_support import INTERPRETED, TOL

from kvcache import KVCacheConfig, KVStore
from kvcache.kernels.append_rows import append_rows_triton
from kvcache.store.page_pool import PagePool

DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


def random_pool(Hkv, d, P, dtype, seed):
    config = KVCacheConfig(num_layers=2, num_kv_heads=Hkv, head_dim=d, page_size=P, dtype=dtype, device=DEVICE,
                           device_pages=12)
    pool = PagePool(config)
    gen = torch.Generator().manual_seed(seed)
    for t in (pool.k_seq, pool.k_dim, pool.v_seq, pool.k_summary):
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    return pool


@pytest.mark.parametrize("B,Hkv,d,P", [(1, 1, 16, 8), (3, 2, 64, 4), (5, 4, 32, 16), (2, 3, 128, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(B, Hkv, d, P, dtype):
    gen = torch.Generator().manual_seed(B * 100 + d)
    ref, out = random_pool(Hkv, d, P, dtype, seed=B), random_pool(Hkv, d, P, dtype, seed=B)
    pages = torch.randperm(12, generator=gen)[:B].tolist()
    kv_slots = torch.randperm(12, generator=gen)[:B].tolist()  # not the page ids: a tiered store's slots
    layer = 1
    start_sums = [torch.randn((2, Hkv, d), generator=gen).to(DEVICE) for _ in range(B)]  # [L, Hkv, d] per sequence
    out_sums = [t.clone() for t in start_sums]
    ref_sums = torch.stack([t[layer] for t in start_sums])
    for slot in [0, 1, P - 1] if P > 1 else [0]:  # a page's first row, the next, its last
        rows = [(p, s, slot if b % 2 == 0 else min(slot + 1, P - 1)) for b, (p, s) in enumerate(zip(pages, kv_slots))]
        k = torch.randn((B, Hkv, d), generator=gen).to(dtype).to(DEVICE)
        v = torch.randn((B, Hkv, d), generator=gen).to(dtype).to(DEVICE)
        ref.append_rows(layer, k, v, rows)
        ref_sums += v.float()
        # row 3: each sequence's value sum of this layer, by address ([L, Hkv, d] float32, contiguous)
        table = torch.tensor([list(c) for c in zip(*rows)] + [[s[layer].data_ptr() for s in out_sums]],
                             dtype=torch.int64).to(DEVICE)
        append_rows_triton(out.k_seq[layer], out.v_seq[layer], out.k_dim[layer], out.k_summary[layer], k, v, table)
    rtol, atol = TOL[torch.float32]
    for name in ("k_seq", "v_seq", "k_dim"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out.k_summary, ref.k_summary, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.stack([s[layer] for s in out_sums]), ref_sums, rtol=rtol, atol=atol)
    assert all((s[0] == s0[0]).all() for s, s0 in zip(out_sums, start_sums))  # the other layer untouched


def test_reference_summaries_equal_a_full_reduction():
    """Rows folded in one at a time give the min, max and mean of the page's filled rows."""
    pool = random_pool(2, 16, 8, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    rows_k = torch.randn((5, 2, 16), generator=gen).to(DEVICE)
    for s in range(5):
        pool.append_rows(0, rows_k[s : s + 1], rows_k[s : s + 1], [(7, 7, s)])
    summary = pool.k_summary[0, 7]  # [Hkv, 3, d]
    torch.testing.assert_close(summary[:, 0], rows_k.amin(0))
    torch.testing.assert_close(summary[:, 1], rows_k.amax(0))
    torch.testing.assert_close(summary[:, 2], rows_k.mean(0))


def test_decode_append_equals_prefill_append():
    """append_tokens (one row per sequence, the batched decode path) leaves the store as a prefill of the same rows."""
    config = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4, dtype=torch.float32,
                           device=DEVICE, device_pages=64)
    decoded, prefilled = KVStore(config), KVStore(config)  # on a GPU, decoded appends by kvcache.kernels.append_rows
    gen = torch.Generator().manual_seed(5)
    lengths = (3, 8, 1)
    ids_d = [decoded.create().seq_id for _ in lengths]
    ids_p = [prefilled.create().seq_id for _ in lengths]
    rows = {n: torch.randn((2, n + 6, 2, 16), generator=gen).to(DEVICE) for n in lengths}  # [k/v, T, Hkv, d]
    for sd, sp, n in zip(ids_d, ids_p, lengths):
        for store, sid in ((decoded, sd), (prefilled, sp)):
            store.append(sid, rows[n][0, :n].expand(2, -1, -1, -1).contiguous(),
                         rows[n][1, :n].expand(2, -1, -1, -1).contiguous())
    for step in range(6):  # crosses page boundaries for every sequence
        k = torch.stack([rows[n][0, n + step] for n in lengths])
        v = torch.stack([rows[n][1, n + step] for n in lengths])
        for layer in (0, 1):
            decoded.append_tokens(ids_d, k, v, layer)
    for sp, n in zip(ids_p, lengths):
        prefilled.append(sp, rows[n][0, n:].expand(2, -1, -1, -1).contiguous(),
                         rows[n][1, n:].expand(2, -1, -1, -1).contiguous())
    for sd, sp in zip(ids_d, ids_p):
        for layer in (0, 1):
            cd, cp = decoded.page_table([sd], layer), prefilled.page_table([sp], layer)
            assert cd.host_lens == cp.host_lens
            pd, pp = cd.pages_of(0), cp.pages_of(0)
            for name in ("k_seq", "v_seq", "k_dim"):
                torch.testing.assert_close(
                    getattr(decoded.pool, name)[layer, pd], getattr(prefilled.pool, name)[layer, pp]
                )
            torch.testing.assert_close(decoded.pool.k_summary[layer, pd], prefilled.pool.k_summary[layer, pp])
        torch.testing.assert_close(decoded.value_mean([sd], 0), prefilled.value_mean([sp], 0))


def test_append_tokens_rejects_bad_batches_and_changes_nothing():
    """A wrong batch size, dtype or a full store raises before any row is written, for every sequence."""
    from kvcache.errors import DTypeMismatch, ShapeMismatch, StoreFull

    config = KVCacheConfig(num_layers=1, num_kv_heads=2, head_dim=16, page_size=4, dtype=torch.float32,
                           device=DEVICE, device_pages=3)
    store = KVStore(config)
    a, b = store.create().seq_id, store.create().seq_id
    store.append(a, torch.randn((1, 3, 2, 16)).to(DEVICE), torch.randn((1, 3, 2, 16)).to(DEVICE))  # room for 1
    store.append(b, torch.randn((1, 8, 2, 16)).to(DEVICE), torch.randn((1, 8, 2, 16)).to(DEVICE))  # full pages
    before = [t.clone() for t in (store.pool.k_seq, store.pool.v_seq, store.pool.k_dim, store.pool.k_summary)]
    row = torch.randn((2, 2, 16)).to(DEVICE)
    cases = [
        (ShapeMismatch, torch.randn((3, 2, 16)).to(DEVICE)),  # three rows for two sequences
        (DTypeMismatch, row.half()),
        (StoreFull, row),  # b needs a new page; none is free
    ]
    for error, k in cases:
        with pytest.raises(error):
            store.append_tokens([a, b], k, k, 0)
        assert store.lengths([a, b], 0) == [3, 8]
        after = (store.pool.k_seq, store.pool.v_seq, store.pool.k_dim, store.pool.k_summary)
        assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_the_kernel_rejects_a_malformed_row_table():
    pool = random_pool(1, 16, 8, torch.float32, seed=0)
    k = torch.zeros((1, 1, 16), device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        append_rows_triton(pool.k_seq[0], pool.v_seq[0], pool.k_dim[0], pool.k_summary[0], k, k,
                           torch.zeros((3, 1), dtype=torch.int32, device=DEVICE))
