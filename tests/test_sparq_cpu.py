"""SparQ's CPU path (kvcache.methods.sparq_cpu: numpy index arithmetic, the flash kernel over the chosen rows) against
the plain torch reference, and that a CPU store's attend takes it."""

import sys

import numpy as np
import pytest
import torch
from kernel_support import HKV, assert_matches, poisoned_allocations, scattered_store

from kvcache import InProcessClient, KVCacheConfig
from kvcache.methods.gather import runs_fit
from kvcache.methods.sparq import sparq
from kvcache.methods.sparq_cpu import sparq_cpu, top_per_row

CASES = [  # (lengths, head_dim, page size, G, r, k, local_window): odd lengths, part-filled and full last pages
    ((37, 11, 61), 64, 8, 4, 8, 9, 2),
    ((16, 17, 15), 32, 16, 1, 5, 15, 0),
    ((100, 40), 128, 4, 2, 16, 40, 40),  # k = the shorter length: every position of it, the window all of k
    ((300,), 64, 16, 3, 8, 37, 9),
]


def _run(store, ids, q, **params):
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    value_mean = store.value_mean(ids, 0)
    reference = sparq(q, view.k_seq, view.k_dim, view.v_seq, value_mean, csr, **params)
    full = {"local_window": 0, "reallocate": True, "scale": None, **params}
    with poisoned_allocations():
        got = sparq_cpu(q, view.k_seq, view.k_dim, view.v_seq, value_mean, csr, nbytes=reference.bytes_read, **full)
    return got, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("lengths", "d", "page_size", "G", "r", "k", "window"), CASES)
def test_sparq_cpu_equals_the_reference(lengths, d, page_size, G, r, k, window, dtype):
    store, ids = scattered_store(lengths, d=d, page_size=page_size, dtype=dtype, seed=len(lengths) + d)
    q = torch.randn((len(ids), HKV * G, d), generator=torch.Generator().manual_seed(d + k)).to(dtype)
    got, reference = _run(store, ids, q, r=r, k=k, local_window=window)
    assert_matches(got.out, got.lse, reference, dtype)
    torch.testing.assert_close(got.coverage, reference.coverage, rtol=1e-5, atol=1e-6)
    assert got.bytes_read == reference.bytes_read


@pytest.mark.parametrize("reallocate", [True, False])
def test_scale_and_reallocation_are_applied_as_the_reference_applies_them(reallocate):
    store, ids = scattered_store((29, 44), d=64, page_size=8, seed=3)
    q = torch.randn((2, HKV * 3, 64), generator=torch.Generator().manual_seed(4))
    got, reference = _run(store, ids, q, r=6, k=12, local_window=3, reallocate=reallocate, scale=0.3)
    assert_matches(got.out, got.lse, reference, torch.float32)
    torch.testing.assert_close(got.coverage, reference.coverage)


def test_a_head_with_no_mass_on_the_group_components_keeps_ratio_one():
    store, ids = scattered_store((21, 9))
    q = torch.zeros((2, HKV * 2, 64))
    q[:, 0::2, :8] = 5.0  # the group's i1 (r = 8) lands on dims 0..7
    q[:, 1::2, 32:] = 0.1  # the other head of each group has nothing there
    got, reference = _run(store, ids, q, r=8, k=5, local_window=1)
    assert torch.isfinite(got.out).all()
    assert_matches(got.out, got.lse, reference, torch.float32)


def test_a_cpu_store_attends_through_it_and_a_view_it_cannot_read_as_runs_is_refused(monkeypatch):
    config = KVCacheConfig(num_layers=2, num_kv_heads=HKV, head_dim=32, page_size=8, dtype=torch.float32,
                           device_pages=32)
    client = InProcessClient(config)
    g = torch.Generator().manual_seed(0)
    seq = client.create().seq_id
    client.append(seq, torch.randn((2, 70, HKV, 32), generator=g), torch.randn((2, 70, HKV, 32), generator=g))
    q = torch.randn((1, HKV * 2, 32), generator=g)
    calls = []
    sparq_module = sys.modules["kvcache.methods.sparq"]  # the package's `sparq` is the reference function
    monkeypatch.setattr(sparq_module, "sparq_cpu", lambda *a, **kw: calls.append(1) or sparq_cpu(*a, **kw))
    got = client.attend([seq], 1, q, "sparq", {"r": 8, "k": 20, "local_window": 4})
    assert calls == [1]
    store = client.store
    view, csr = store.layer_view(1), store.page_table([seq], 1)
    reference = sparq(q, view.k_seq, view.k_dim, view.v_seq, store.value_mean([seq], 1), csr, 8, 20, 4)
    assert_matches(got.out, got.lse, reference, torch.float32)
    assert runs_fit(view.k_seq, 32) and runs_fit(view.v_seq, 32) and runs_fit(view.k_dim, 8)
    assert not runs_fit(view.k_seq[:, :, :, 1:], 32)  # rows no longer start at multiples of d


def _top_sets(indices):
    return [set(row.tolist()) for row in indices]


@pytest.mark.parametrize("rows,m,n", [(3, 8064, 448), (2, 1000, 1), (4, 333, 40), (1, 64, 63), (3, 50, 50), (2, 17, 5)])
@pytest.mark.parametrize("kind", ["softmax", "uniform", "ties"])
def test_top_per_row_takes_each_rows_n_largest(rows, m, n, kind):
    gen = np.random.default_rng(rows * 1000 + m + n)
    if kind == "softmax":
        scores = torch.softmax(torch.from_numpy(gen.standard_normal((rows, m)) * 2), -1).numpy().astype(np.float32)
    elif kind == "uniform":
        scores = gen.random((rows, m), dtype=np.float32)
    else:  # few distinct values: many ties at the n-th largest
        scores = gen.integers(0, 4, (rows, m)).astype(np.float32)
    out = np.full((rows, n), -1, dtype=np.int64)
    assert top_per_row(scores, n, out) is out
    for i in range(rows):
        assert len(set(out[i].tolist())) == n and out[i].min() >= 0 and out[i].max() < m
        kth = np.sort(scores[i])[m - n]  # the n-th largest value
        assert (scores[i, out[i]] >= kth).all()  # every one chosen is among the n largest (ties at kth: any of them)
        assert (scores[i] > kth).sum() <= (scores[i, out[i]] > kth).sum()  # and every score above kth is chosen
    if kind == "uniform":
        assert _top_sets(out) == _top_sets(np.argpartition(scores, m - n, axis=1)[:, m - n :])


def test_top_per_row_falls_back_where_the_sample_misses_the_row(monkeypatch):
    # A row whose largest scores all sit off the sample's stride: the threshold lands above them, too few exceed it.
    scores = np.zeros((2, 4096), dtype=np.float32)
    scores[0, 1::16] = np.arange(256, dtype=np.float32) + 1  # off the sampled positions 0, 16, 32, ...
    scores[0, 0::16] = 1000.0  # the sample sees only these: its threshold is 1000
    scores[1] = np.random.default_rng(0).random(4096, dtype=np.float32)
    n = 300
    out = np.empty((2, n), dtype=np.int64)
    top_per_row(scores, n, out)
    assert _top_sets(out) == _top_sets(np.argpartition(scores, 4096 - n, axis=1)[:, 4096 - n :])
