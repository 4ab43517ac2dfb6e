"""The store's gate-key cache (kvcache.methods.gate_store.GateKeyCache, docs/sparse-attention.md §3): after any
sequence of
appends, decode steps, forks, prefix sharing and frees, every live page's cached gate key equals the
reference's gate_keys recomputed at its index in its sequence: from the page's summary, or for a pre-RoPE gate
from the sequence's keys rotated back (every test runs with both kinds of gate)."""

from __future__ import annotations

import pytest
import torch

from kvcache import KVCacheConfig, KVStore
from kvcache.methods.gate_model import GateShape, PageGate, gate_keys, gate_logits, gate_pooled
from kvcache.methods.gate_store import attach_gate, gate_key_cache, layer_gate_of
from kvcache.methods.gather import gather_sequence
from kvcache.store.tiers import DISK, HOST

L, HKV, D, P = 2, 2, 16, 4
MODEL_ROPE_BASE = {"rotated": 0.0, "pre_rope": 500.0}
_kind = "rotated"


@pytest.fixture(autouse=True, params=list(MODEL_ROPE_BASE))
def _gate_kind(request):
    global _kind
    _kind = request.param
    yield
    _kind = "rotated"


def _gate(seed: int = 1, gate_dim: int = 32) -> PageGate:
    shape = GateShape(L, HKV, 3, D, P, gate_dim=gate_dim, rope_base=100.0, model_rope_base=MODEL_ROPE_BASE[_kind])
    return PageGate(shape, seed=seed)


def _store(dtype=torch.float32) -> KVStore:
    return KVStore(KVCacheConfig(L, HKV, D, page_size=P, dtype=dtype, device_pages=64))


def _kv(gen, T, dtype=torch.float32, layers=True):
    shape = (L, T, HKV, D) if layers else (T, HKV, D)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def _assert_cache_matches_reference(store: KVStore, gate: PageGate, exact: bool = True) -> int:
    """Compare every live sequence's pages at every layer; returns how many (layer, page) keys were checked."""
    cache = gate_key_cache(store)
    checked = 0
    for layer in range(L):
        for sid in store.sequence_ids():
            csr = store.page_table([sid], layer)
            pages = csr.pages_of(0)
            if len(pages) == 0:
                continue
            view = store.layer_view(layer)
            keys = gather_sequence(view.k_seq, csr, 0)  # [Hkv, S, d]: what a pre-RoPE gate pools
            want = gate_keys(gate.layer(layer), gate_pooled(gate.layer(layer), view.k_summary[pages], keys))
            got = cache.keys[layer, pages]
            if exact:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:  # a cache in the KV dtype holds the reference's keys rounded to it
                torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=0)
            checked += len(pages)
    return checked


def test_keys_follow_appends_decode_steps_and_page_boundaries():
    gen = torch.Generator().manual_seed(0)
    store, gate = _store(), _gate()
    attach_gate(store, gate)
    a = store.create().seq_id
    store.append(a, *_kv(gen, 6))  # a page and a half, all layers
    assert _assert_cache_matches_reference(store, gate) == 2 * 2
    for _step in range(7):  # decode steps, one layer at a time, across two page boundaries
        for layer in range(L):
            k, v = _kv(gen, 1, layers=False)
            store.append(a, k, v, layer=layer)
            _assert_cache_matches_reference(store, gate)
    store.append(a, *_kv(gen, 9))  # a chunk ending mid-page
    assert _assert_cache_matches_reference(store, gate) == 2 * 6


def test_keys_follow_forks_prefix_sharing_and_freed_pages_reused_at_other_indexes():
    gen = torch.Generator().manual_seed(1)
    store, gate = _store(), _gate()
    attach_gate(store, gate)
    tokens = list(range(13))
    a = store.create(token_ids=tokens).seq_id
    store.append(a, *_kv(gen, 13), token_ids=tokens)
    child = store.fork(a).seq_id  # shares 4 pages; the partial last page is copied on write
    k, v = _kv(gen, 1, layers=False)
    for layer in range(L):
        store.append(child, k, v, layer=layer)
    store.append(a, *_kv(gen, 5))
    _assert_cache_matches_reference(store, gate)
    # A new sequence with the same first 12 tokens reuses 3 cached pages at the same indexes.
    b = store.create(token_ids=tokens[:12] + [99, 98]).seq_id
    assert store.describe(b).cached_tokens == 12
    store.append(b, *_kv(gen, 2), start=12)
    _assert_cache_matches_reference(store, gate)
    # Freed pages come back under new sequences at other page indexes with other keys.
    store.free(a)
    store.free(child)
    c = store.create().seq_id
    store.append(c, *_kv(gen, 3))
    d = store.create().seq_id
    store.append(d, *_kv(gen, 23))
    assert _assert_cache_matches_reference(store, gate) == 2 * (4 + 1 + 6)


def test_a_gate_attached_after_the_data_computes_the_keys_of_every_held_page_and_replaces_the_old_one():
    gen = torch.Generator().manual_seed(2)
    store = _store()
    ids = [store.create().seq_id for _ in range(3)]
    for sid, S in zip(ids, (9, 16, 1)):
        store.append(sid, *_kv(gen, S))
    attach_gate(store, _gate(seed=5))
    gate = _gate(seed=7)
    attach_gate(store, gate)
    assert len(store.summary_listeners) == 1  # the first gate's cache no longer listens
    assert _assert_cache_matches_reference(store, gate) == 2 * (3 + 4 + 1)
    store.append(ids[2], *_kv(gen, 4))
    _assert_cache_matches_reference(store, gate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cache_in_the_kv_dtype_holds_the_reference_keys_rounded(dtype):
    gen = torch.Generator().manual_seed(3)
    store, gate = _store(dtype), _gate()
    attach_gate(store, gate)
    assert gate_key_cache(store).keys.dtype == dtype
    sid = store.create().seq_id
    store.append(sid, *_kv(gen, 10, dtype))
    for layer in range(L):
        store.append(sid, *_kv(gen, 1, dtype, layers=False), layer=layer)
    assert _assert_cache_matches_reference(store, gate, exact=False) == 2 * 3


def test_scores_from_the_cached_keys_equal_the_reference_scores():
    gen = torch.Generator().manual_seed(4)
    store, gate = _store(), _gate()
    attach_gate(store, gate, key_dtype=torch.float32)
    sid = store.create().seq_id
    store.append(sid, *_kv(gen, 29))
    q = torch.randn((HKV, 3, D), generator=gen)
    lg = layer_gate_of(store, 1)
    csr = store.page_table([sid], 1)
    pages = csr.pages_of(0)
    keys = gather_sequence(store.layer_view(1).k_seq, csr, 0)
    want = gate_logits(lg, q, store.layer_view(1).k_summary[pages], keys)
    from kvcache.methods.gate_model import gate_queries

    qg = gate_queries(lg, q, torch.tensor(len(pages) - 1), torch.tensor(28))  # the query at the last position
    got = torch.einsum("hd,nhd->hn", qg, lg.keys[pages]) / lg.shape.gate_dim ** 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_copy_on_write_by_one_layer_refreshes_the_copied_page_in_every_layer():
    # A fork's first decode append (one layer) copies the shared partial page in every layer; the
    # layers not yet appended read the copy's summaries, so their keys must follow at once.
    gen = torch.Generator().manual_seed(5)
    store, gate = _store(), _gate()
    attach_gate(store, gate)
    a = store.create().seq_id
    store.append(a, *_kv(gen, 13))
    child = store.fork(a).seq_id
    k, v = _kv(gen, 1, layers=False)
    store.append(child, k, v, layer=0)
    assert _assert_cache_matches_reference(store, gate) == 2 * (4 + 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a GPU")
def test_cuda_decode_appends_with_a_gate_attached_never_wait_for_the_gpu():
    store = KVStore(KVCacheConfig(L, HKV, D, page_size=P, dtype=torch.bfloat16, device="cuda", device_pages=64))
    attach_gate(store, _gate())
    a = store.create().seq_id
    k = torch.randn(L, 13, HKV, D, device="cuda", dtype=torch.bfloat16)
    store.append(a, k, k)
    row = torch.randn(1, HKV, D, device="cuda", dtype=torch.bfloat16)
    for layer in range(L):  # warm-up, and the step that starts a page
        store.append(a, row, row, layer=layer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):  # within a page and across the boundary at 16
            for layer in range(L):
                store.append(a, row, row, layer=layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_gate_attached_to_a_tiered_store_reads_the_rows_of_pages_off_the_device(tmp_path):
    """Attaching pools every held page, wherever its K/V lives (pinned host, disk): the keys equal the reference's
    on the sequence's keys as appended."""
    gen = torch.Generator().manual_seed(6)
    store = KVStore(KVCacheConfig(L, HKV, D, page_size=P, dtype=torch.float32, device_pages=4, host_pages=4,
                                  disk_pages=8, disk_path=str(tmp_path), pinned_tail_pages=1))
    sid = store.create().seq_id
    k, v = _kv(gen, 37)  # 10 pages: most of them below the device tier
    store.append(sid, k, v)
    tiers = store.tiers.tier[store.page_table([sid], 0).pages_of(0)].tolist()
    assert {HOST, DISK} <= set(tiers), tiers
    gate = _gate(seed=3)
    attach_gate(store, gate)
    pages = store.page_table([sid], 0).pages_of(0)
    for layer in range(L):
        lg = gate.layer(layer)
        want = gate_keys(lg, gate_pooled(lg, store.layer_view(layer).k_summary[pages], k[layer].transpose(0, 1)))
        torch.testing.assert_close(gate_key_cache(store).keys[layer, pages], want, rtol=1e-5, atol=1e-5)


def test_a_decode_steps_device_update_equals_the_host_update():
    """update_step (what a captured CUDA graph replays) recomputes the step's last pages as update() does."""
    store = _store()
    gate = _gate()
    attach_gate(store, gate)
    gen = torch.Generator().manual_seed(11)
    lengths = (6, 9, 3)  # the last pages hold 2, 1 and 3 of their 4 rows
    ids = []
    for n in lengths:
        sid = store.create().seq_id
        store.append(sid, *_kv(gen, n))
        ids.append(sid)
    cache = gate_key_cache(store)
    want = cache.keys.clone()
    cache.keys.zero_()
    for layer in range(L):
        csr = store.page_table(ids, layer)
        last = csr.indptr[1:].long() - 1
        page_ids = csr.indices.long()[last]
        indexes = torch.tensor([(n - 1) // P for n in lengths])
        fills = torch.tensor([(n - 1) % P + 1 for n in lengths])
        cache.update_step(layer, store.layer_view(layer).k_seq, page_ids, indexes, fills)
        torch.testing.assert_close(cache.keys[layer, page_ids], want[layer, page_ids], rtol=1e-5, atol=1e-5)
