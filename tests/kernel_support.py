"""Shared by the kernel tests: poisoned allocations, stores with scattered page ids, tolerances."""

import os
from contextlib import contextmanager

import pytest
import torch

from kvcache import KVCacheConfig, KVStore

HKV = 2
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


def assert_matches(out, lse, ref, dtype):
    """Kernel (out, lse) equal the reference's within the dtype's tolerance, with nothing left unwritten."""
    assert out.dtype == dtype and out.shape == ref.out.shape and lse.shape == ref.lse.shape
    assert not out.isnan().any(), "an output element was never written"
    assert not lse.isnan().any(), "an lse element was never written"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.out.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, ref.lse, rtol=LSE_TOL, atol=LSE_TOL)
