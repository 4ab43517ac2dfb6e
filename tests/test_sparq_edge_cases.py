"""SparQ at the edges §1 leaves open: wide heads, q = 0, saturated scores, a custom scale, unsupported shapes."""

import math

import pytest
import torch
from kernel_support import HKV, assert_matches, scattered_store

from kvcache import InProcessClient, InvalidParameter, KVCacheConfig
from kvcache.kernels.sparq import sparq_decode
from kvcache.methods import dense, sparq

BLOCKS = {"block_n": 32, "topk_block": 64}


def run_both(store, ids, q, **params):
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    args = (q, view.k_seq, view.k_dim, view.v_seq, store.value_mean(ids, 0), csr)
    return sparq_decode(*args, **params, **BLOCKS), sparq(*args, **params)


def test_components_beyond_index_255_can_be_chosen_by_the_kernel():
    store, ids = scattered_store((21, 9), d=512)
    q = torch.randn((2, HKV, 512), generator=torch.Generator().manual_seed(3))
    q[:, :, 300:310] *= 50  # the largest components all sit past index 255
    (out, lse), ref = run_both(store, ids, q, r=8, k=6, local_window=2)
    assert_matches(out, lse, ref, torch.float32)


def test_a_zero_query_gives_finite_output_in_kernel_and_reference():
    store, ids = scattered_store((21, 9))
    q = torch.zeros((2, HKV * 4, 64))
    (out, lse), ref = run_both(store, ids, q, r=4, k=5, local_window=1)
    # Every score ties, so the two may pick different rows: compare what does not depend on which.
    for o, s in ((out, lse), (ref.out, ref.lse)):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(s, torch.full_like(s, math.log(5)))


def test_a_head_with_no_mass_on_the_group_components_stays_finite():
    store, ids = scattered_store((21, 9))
    q = torch.zeros((2, HKV * 2, 64))
    q[:, 0::2, :8] = 5.0  # the group's i1 (r = 8) lands on dims 0..7
    q[:, 1::2, 32:] = 0.1  # the other head of each group has nothing there
    (out, lse), ref = run_both(store, ids, q, r=8, k=5, local_window=1)
    assert torch.isfinite(ref.out).all()
    assert_matches(out, lse, ref, torch.float32)


def test_the_local_window_is_kept_even_when_one_position_takes_all_the_mass():
    config = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=16, page_size=4, dtype="float32", device_pages=16)
    client = InProcessClient(config)
    seq = client.create().seq_id
    k = torch.randn(12, 1, 16) * 0.01
    k[0] = 100.0  # a sink every query saturates on
    client.append(seq, k, torch.randn(12, 1, 16), layer=0)
    q = torch.ones(1, 1, 16)
    res = client.attend([seq], 0, q, "sparq", {"r": 16, "k": 4, "local_window": 4})
    window = client.fetch(seq, 0, "rows", torch.arange(8, 12)[None])
    logits = (q[0, 0] @ window.tensors[0][0].T) / math.sqrt(16)
    torch.testing.assert_close(res.lse[0, 0], torch.logsumexp(logits, 0), rtol=1e-5, atol=1e-5)


def test_a_custom_scale_applies_to_both_stages_and_reading_everything_equals_dense():
    store, ids = scattered_store((13, 13))
    q = torch.randn((2, HKV * 4, 64), generator=torch.Generator().manual_seed(5))
    (out, lse), ref = run_both(store, ids, q, r=64, k=13, local_window=0, scale=0.05)
    assert_matches(out, lse, ref, torch.float32)
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    exact = dense(q, view.k_seq, view.v_seq, csr, scale=0.05)
    torch.testing.assert_close(ref.lse, exact.lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "x", True])
def test_a_bad_scale_is_an_invalid_parameter(scale):
    client = InProcessClient(KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=16, dtype="float32",
                                           device_pages=8))
    seq = client.create().seq_id
    client.append(seq, torch.randn(5, 1, 16), torch.randn(5, 1, 16), layer=0)
    with pytest.raises(InvalidParameter, match="scale"):
        client.attend([seq], 0, torch.randn(1, 1, 16), "dense", {"scale": scale})


def test_the_triton_backend_refuses_a_head_dim_its_kernels_cannot_tile():
    client = InProcessClient(KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=24, dtype="float32",
                                           device_pages=8))
    seq = client.create().seq_id
    client.append(seq, torch.randn(5, 1, 24), torch.randn(5, 1, 24), layer=0)
    q = torch.randn(1, 1, 24)
    with pytest.raises(InvalidParameter, match="head_dim 24"):
        client.attend([seq], 0, q, "dense", backend="triton")
    assert client.attend([seq], 0, q, "dense").out.shape == (1, 1, 24)  # auto: the reference serves it


@pytest.mark.parametrize("n", [0, 1, 37, 99, 100])
def test_the_top_positions_are_the_torch_topk_set(n):
    from kvcache.methods.sparq import top_positions

    scores = torch.rand((3, 100), generator=torch.Generator().manual_seed(11))
    got = top_positions(scores, n)
    assert got.shape == (3, n) and got.dtype == torch.int64
    want = torch.topk(scores, n, dim=-1).indices
    assert [sorted(row) for row in got.tolist()] == [sorted(row) for row in want.tolist()]
