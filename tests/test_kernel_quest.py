"""kernels.quest.quest_decode against the torch reference kvcache.methods.quest (page bounds, ALGORITHMS.md §3).

Kernels run on the CPU under the Triton interpreter, so shapes are tiny and block sizes small.
Every kernel call runs with torch.empty / torch.empty_like poisoned (NaN for floats, -7 for
ints), so an output element the kernels never write shows up instead of passing by luck.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on the CPU

from contextlib import contextmanager

import pytest
import torch

from kernels.quest import quest_decode
from kvcache import KVCacheConfig, KVStore
from kvcache.methods import dense, quest

HKV = 2
LENGTHS = (37, 1, 80)  # mixed; with pages of 8: 5 pages (the last partly filled), 1 page of 1 row, 10 full pages
TOL = {  # (rtol, atol) on outputs of unit scale, from the dtype's precision
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LSE_TOL = 1e-5  # lse is computed in float32 whatever the store dtype
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NO_BF16_ON_CPU = "bf16 tl.dot is checked on the GPU: the CPU interpreter computes it wrongly"


@contextmanager
def poisoned_allocations():
    """While active, torch.empty / torch.empty_like return NaN (float) or -7 (int) instead of garbage."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7 if t.dtype.is_signed else 7)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
        mp.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
        yield


def scattered_store(lengths, *, d=64, page_size=8, dtype=torch.float32, seed=0, device="cpu"):
    """A one-layer store with one sequence per length whose page ids are scattered, and their ids.

    The sequences are appended in interleaved random chunks next to two filler sequences; one
    filler is forked (the child keeps appending) and both are freed midway, so later pages reuse
    freed ids out of order.
    """
    config = KVCacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=d, page_size=page_size, dtype=dtype,
                           device=device, device_pages=128)
    store = KVStore(config)
    gen = torch.Generator().manual_seed(seed)
    ids = [store.create().seq_id for _ in lengths]
    fillers = [store.create().seq_id for _ in range(2)]
    remaining = dict(zip(ids, lengths))
    live_fillers = list(fillers)
    rounds = 0
    while any(remaining.values()):
        for sid in ids + live_fillers:
            T = int(torch.randint(1, page_size + 4, (), generator=gen))
            if sid in remaining:
                T = min(T, remaining[sid])
                remaining[sid] -= T
            if T:
                k = torch.randn((T, HKV, d), generator=gen).to(dtype)
                v = torch.randn((T, HKV, d), generator=gen).to(dtype)
                store.append(sid, k, v, layer=0)
        rounds += 1
        if rounds == 1:
            live_fillers.append(store.fork(fillers[0]).seq_id)
        elif rounds in (2, 3):
            store.free(live_fillers.pop(0))
    return store, ids


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


def assert_matches(out, lse, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.out.shape and lse.shape == ref.lse.shape
    assert not out.isnan().any(), "an output element was never written"
    assert not lse.isnan().any(), "an lse element was never written"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.out.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, ref.lse, rtol=LSE_TOL, atol=LSE_TOL)


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
def test_quest_decode_matches_the_reference_on_a_mixed_batch(G, d, dtype, page_size):
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
    # 19 pages of 8: more than one block of page bounds (16 pages in kernels.tuning), so several splits.
    out, lse, ref, _ = run_both(7, lengths=(150, 41), dtype=torch.float16)
    assert_matches(out, lse, ref, torch.float16)


@pytest.mark.skipif(INTERPRETED, reason="bf16 needs compiled kernels: run with TRITON_INTERPRET=0 on a GPU")
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_BF16_ON_CPU)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_bfloat16_matches_the_reference_on_the_gpu(G):
    out, lse, ref, _ = run_both(3, G=G, d=128, dtype=torch.bfloat16, page_size=16, device="cuda")
    assert_matches(out, lse, ref, torch.bfloat16)
