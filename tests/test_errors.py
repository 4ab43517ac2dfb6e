"""Bad input: each raises its specific kvcache.errors class with a message naming the problem,
and changes nothing (the target sequence, the other sequences and the pool are as before)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kvcache import (
    DTypeMismatch,
    InvalidParameter,
    KVCacheError,
    PositionOutOfRange,
    SequenceNotFound,
    ShapeMismatch,
    StoreFull,
)

L, HKV, D, P = 2, 2, 16, 4


@pytest.fixture
def setup(make_client, random_kv):
    """A client with two sequences: `seq` (10 positions) and `other` (7 positions)."""
    client = make_client(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=P, device_pages=64)
    gen = torch.Generator().manual_seed(0)
    seq = client.create().seq_id
    client.append(seq, *random_kv(gen, (L, 10, HKV, D)))
    other = client.create().seq_id
    client.append(other, *random_kv(gen, (L, 7, HKV, D)))
    return client, seq, other, gen


@pytest.fixture
def unchanged(snapshot, assert_unchanged):
    """with unchanged(client): ... -- every live sequence and the pool are the same after the block."""

    @contextlib.contextmanager
    def check(client):
        store = client.store
        ids = store.sequence_ids()
        before = {sid: snapshot(store, sid) for sid in ids}
        usage = store.pool_usage()
        refcount = store.allocator.refcount.clone()
        yield
        assert store.sequence_ids() == ids
        for sid in ids:
            assert_unchanged(before[sid], snapshot(store, sid))
        assert store.pool_usage() == usage
        assert torch.equal(store.allocator.refcount, refcount)

    return check


def _kv(gen, shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


# ---- the exception classes ---------------------------------------------------------------------


def test_error_classes_form_the_documented_hierarchy():
    for cls in (InvalidParameter, ShapeMismatch, DTypeMismatch, SequenceNotFound, PositionOutOfRange, StoreFull):
        assert issubclass(cls, KVCacheError)
    assert issubclass(ShapeMismatch, InvalidParameter) and issubclass(DTypeMismatch, InvalidParameter)
    assert issubclass(InvalidParameter, ValueError)
    assert issubclass(SequenceNotFound, KeyError)
    assert issubclass(PositionOutOfRange, IndexError)
    assert issubclass(StoreFull, MemoryError)
    assert InvalidParameter.grpc_code == ShapeMismatch.grpc_code == "INVALID_ARGUMENT"
    assert SequenceNotFound.grpc_code == "NOT_FOUND"
    assert PositionOutOfRange.grpc_code == "OUT_OF_RANGE"
    assert StoreFull.grpc_code == "RESOURCE_EXHAUSTED"


def test_sequence_not_found_message_is_not_quoted_like_a_key_error():
    assert str(SequenceNotFound("sequence 'x' unknown")) == "sequence 'x' unknown"


# ---- append: shapes and dtypes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(L, 3, HKV + 1, D), (L, 3, HKV, D + 8), (L + 1, 3, HKV, D), (3, HKV, D), (1, L, 3, HKV, D)],
    ids=["heads", "head_dim", "layers", "3d-without-layer", "5d"],
)
def test_append_of_all_layers_with_a_wrong_shape_raises_shape_mismatch(setup, unchanged, shape):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match=r"k has shape .*expected \[L, T, Hkv, d\]"):
        client.append(seq, *_kv(gen, shape))


@pytest.mark.parametrize("shape", [(3, HKV + 1, D), (3, HKV, D - 8), (L, 3, HKV, D)], ids=["heads", "head_dim", "4d"])
def test_append_of_one_layer_with_a_wrong_shape_raises_shape_mismatch(setup, unchanged, shape):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match=r"k has shape .*expected \[T, Hkv, d\]"):
        client.append(seq, *_kv(gen, shape), layer=1)


def test_append_with_a_wrong_value_shape_raises_shape_mismatch(setup, unchanged):
    client, seq, _, gen = setup
    k, _ = _kv(gen, (L, 3, HKV, D))
    _, v = _kv(gen, (L, 3, HKV, D + 8))
    with unchanged(client), pytest.raises(ShapeMismatch, match="v has shape"):
        client.append(seq, k, v)


def test_append_with_k_and_v_of_different_lengths_raises_shape_mismatch(setup, unchanged):
    client, seq, _, gen = setup
    k, _ = _kv(gen, (L, 3, HKV, D))
    _, v = _kv(gen, (L, 4, HKV, D))
    with unchanged(client), pytest.raises(ShapeMismatch, match="differ in shape"):
        client.append(seq, k, v)


def test_append_of_no_positions_raises_shape_mismatch(setup, unchanged):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="no positions"):
        client.append(seq, *_kv(gen, (L, 0, HKV, D)))


def test_append_of_something_not_a_tensor_raises_shape_mismatch(setup, unchanged):
    client, seq, _, gen = setup
    k, v = _kv(gen, (L, 2, HKV, D))
    with unchanged(client), pytest.raises(ShapeMismatch, match="torch.Tensor"):
        client.append(seq, k.tolist(), v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("which", ["k", "v"])
def test_append_in_another_dtype_raises_dtype_mismatch(setup, unchanged, dtype, which):
    client, seq, _, gen = setup
    k, v = _kv(gen, (L, 3, HKV, D))
    if which == "k":
        k = k.to(dtype)
    else:
        v = v.to(dtype)
    with unchanged(client), pytest.raises(DTypeMismatch, match=f"{which} has dtype .*store holds torch.float32"):
        client.append(seq, k, v)


@pytest.mark.parametrize("layer", [-1, L, 7])
def test_append_to_a_layer_out_of_range_raises_invalid_parameter(setup, unchanged, layer):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="layer"):
        client.append(seq, *_kv(gen, (3, HKV, D)), layer=layer)


# ---- append: positions and token ids -----------------------------------------------------------


@pytest.mark.parametrize("start", [0, 9, 11, 100])
def test_append_at_a_start_other_than_the_current_length_raises_position_out_of_range(setup, unchanged, start):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(PositionOutOfRange, match="next position is 10"):
        client.append(seq, *_kv(gen, (L, 2, HKV, D)), start=start)


def test_append_of_one_layer_at_a_wrong_start_raises_position_out_of_range(setup, unchanged):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(PositionOutOfRange, match="next position is 10"):
        client.append(seq, *_kv(gen, (2, HKV, D)), layer=0, start=12)


def test_append_of_all_layers_when_layers_hold_different_lengths_raises_position_out_of_range(
    setup, unchanged
):
    client, seq, _, gen = setup
    client.append(seq, *_kv(gen, (3, HKV, D)), layer=0)  # layer 0: 13, layer 1: 10
    with unchanged(client), pytest.raises(PositionOutOfRange, match="different lengths"):
        client.append(seq, *_kv(gen, (L, 1, HKV, D)))


def test_append_with_a_wrong_number_of_token_ids_raises_shape_mismatch(setup, unchanged):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="token ids"):
        client.append(seq, *_kv(gen, (L, 3, HKV, D)), token_ids=[1, 2])


def test_append_with_token_ids_that_contradict_the_known_ones_raises_invalid_parameter(make_client, unchanged):
    client = make_client(page_size=P)
    gen = torch.Generator().manual_seed(1)
    seq = client.create(token_ids=[5, 6, 7, 8, 9]).seq_id
    with unchanged(client), pytest.raises(InvalidParameter, match="differ"):
        client.append(seq, *_kv(gen, (L, 3, HKV, D)), token_ids=[5, 6, 0])


def test_append_with_token_ids_after_positions_without_them_raises_position_out_of_range(setup, unchanged):
    client, seq, _, gen = setup  # 10 positions, no token ids known
    with unchanged(client), pytest.raises(PositionOutOfRange, match="ids are known only up to 0"):
        client.append(seq, *_kv(gen, (L, 2, HKV, D)), token_ids=[1, 2])


@pytest.mark.parametrize("bad", [[-1, 2], [1.5, 2], [True, 2]])
def test_negative_or_non_int_token_ids_raise_invalid_parameter(setup, unchanged, bad):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="token_ids"):
        client.create(token_ids=bad)
    with unchanged(client), pytest.raises(InvalidParameter, match="token_ids"):
        client.append(seq, *_kv(gen, (L, 2, HKV, D)), token_ids=bad)


# ---- unknown sequences -------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["append", "attend", "fork", "free", "describe", "fetch"])
@pytest.mark.parametrize("how", ["never-created", "freed"])
def test_unknown_sequence_raises_sequence_not_found(setup, unchanged, call, how):
    client, seq, other, gen = setup
    if how == "freed":
        bad = client.create().seq_id
        client.free(bad)
    else:
        bad = "0123456789abcdef"
    calls = {
        "append": lambda: client.append(bad, *_kv(gen, (L, 2, HKV, D))),
        "attend": lambda: client.attend([other, bad], 0, torch.randn(2, HKV, D)),
        "fork": lambda: client.fork(bad),
        "free": lambda: client.free(bad),
        "describe": lambda: client.describe(bad),
        "fetch": lambda: client.fetch(bad, 0, "value_mean"),
    }
    with unchanged(client), pytest.raises(SequenceNotFound, match=bad):
        calls[call]()


def test_freeing_a_sequence_twice_raises_sequence_not_found(setup, unchanged):
    client, seq, _, _ = setup
    client.free(seq)
    with unchanged(client), pytest.raises(SequenceNotFound, match="unknown"):
        client.free(seq)


# ---- a full pool -------------------------------------------------------------------------------


def test_append_beyond_the_free_pages_raises_store_full_and_changes_nothing(make_client, unchanged):
    client = make_client(page_size=P, device_pages=6)
    gen = torch.Generator().manual_seed(2)
    other = client.create().seq_id
    client.append(other, *_kv(gen, (L, 9, HKV, D)))  # 3 pages
    seq = client.create().seq_id
    client.append(seq, *_kv(gen, (L, 5, HKV, D)))  # 2 pages, 1 left free
    with unchanged(client), pytest.raises(StoreFull, match="need 2 free pages, only 1"):
        client.append(seq, *_kv(gen, (L, 8, HKV, D)))  # 13 positions need 4 pages
    # The failed append left the sequence where it was: the next append starts at 5.
    assert client.append(seq, *_kv(gen, (L, 3, HKV, D)), start=5).lengths == (8, 8)


def test_copy_on_write_on_a_full_pool_raises_store_full_and_changes_nothing(make_client, unchanged):
    client = make_client(page_size=P, device_pages=3)
    gen = torch.Generator().manual_seed(3)
    parent = client.create().seq_id
    client.append(parent, *_kv(gen, (L, 6, HKV, D)))  # pages 0, 1 (partial)
    filler = client.create().seq_id
    client.append(filler, *_kv(gen, (L, 4, HKV, D)))  # page 2: the pool is full
    child = client.fork(parent).seq_id
    with unchanged(client), pytest.raises(StoreFull, match="free pages"):
        client.append(child, *_kv(gen, (L, 1, HKV, D)))  # needs a copy of the shared page 1
    with unchanged(client), pytest.raises(StoreFull, match="free pages"):
        client.append(parent, *_kv(gen, (1, HKV, D)), layer=1)


def test_one_layer_append_on_a_full_pool_raises_store_full_and_changes_nothing(make_client, unchanged):
    client = make_client(page_size=P, device_pages=2)
    gen = torch.Generator().manual_seed(4)
    seq = client.create().seq_id
    client.append(seq, *_kv(gen, (8, HKV, D)), layer=0)
    with unchanged(client), pytest.raises(StoreFull):
        client.append(seq, *_kv(gen, (1, HKV, D)), layer=0)
    client.append(seq, *_kv(gen, (8, HKV, D)), layer=1)  # layer 1 still fits in the pages layer 0 took


# ---- attend: the query -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, HKV, D), (2, HKV, D + 8), (2, HKV + 1, D), (2, HKV * 2, D, 1), (HKV, D)],
    ids=["batch", "head_dim", "heads-not-a-multiple", "4d", "2d"],
)
def test_attend_with_a_wrong_query_shape_raises_shape_mismatch(setup, unchanged, shape):
    client, seq, other, _ = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="q has shape"):
        client.attend([seq, other], 0, torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_attend_with_a_query_in_another_dtype_raises_dtype_mismatch(setup, unchanged, dtype):
    client, seq, other, _ = setup
    with unchanged(client), pytest.raises(DTypeMismatch, match="q has dtype"):
        client.attend([seq, other], 0, torch.randn(2, HKV, D).to(dtype))


def test_attend_with_no_sequences_raises_shape_mismatch(setup, unchanged):
    client, *_ = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="at least one sequence"):
        client.attend([], 0, torch.randn(0, HKV, D))


def test_attend_with_a_sequence_twice_raises_invalid_parameter(setup, unchanged):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="twice"):
        client.attend([seq, seq], 0, torch.randn(2, HKV, D))


@pytest.mark.parametrize("layer", [-1, L])
def test_attend_at_a_layer_out_of_range_raises_invalid_parameter(setup, unchanged, layer):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="layer"):
        client.attend([seq], layer, torch.randn(1, HKV, D))


def test_attend_to_an_empty_sequence_raises_position_out_of_range(setup, unchanged):
    client, seq, _, _ = setup
    empty = client.create().seq_id
    with unchanged(client), pytest.raises(PositionOutOfRange, match="no cached positions"):
        client.attend([seq, empty], 0, torch.randn(2, HKV, D))


# ---- attend: methods and parameters ------------------------------------------------------------


def test_unknown_method_raises_invalid_parameter(setup, unchanged):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="unknown attention method 'sparse'"):
        client.attend([seq], 0, torch.randn(1, HKV, D), "sparse")


@pytest.mark.parametrize(
    "method, params",
    [("dense", {"r": 4}), ("sparq", {"r": 4, "k": 4, "topk": 3}), ("quest", {"top_pages": 2, "pages": 1})],
)
def test_unknown_parameter_names_raise_invalid_parameter(setup, unchanged, method, params):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="unknown parameters"):
        client.attend([seq], 0, torch.randn(1, HKV, D), method, params)


@pytest.mark.parametrize("method, params", [("sparq", {}), ("sparq", {"r": 4}), ("quest", {})])
def test_missing_required_parameters_raise_invalid_parameter(setup, unchanged, method, params):
    # A missing parameter is bad input like any other: a TypeError would reach the service as INTERNAL rather
    # than INVALID_ARGUMENT.
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter):
        client.attend([seq], 0, torch.randn(1, HKV, D), method, params)


@pytest.mark.parametrize("r", [D + 1, 64, 0, -2])
def test_sparq_with_r_outside_1_to_d_raises_invalid_parameter(setup, unchanged, r):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match=f"r={r}"):
        client.attend([seq], 0, torch.randn(1, HKV, D), "sparq", {"r": r, "k": 4})


def test_sparq_with_k_beyond_the_shortest_sequence_raises_invalid_parameter(setup, unchanged):
    client, seq, other, _ = setup  # 10 and 7 positions
    with unchanged(client), pytest.raises(InvalidParameter, match="k=8 exceeds the cached length S=7"):
        client.attend([seq, other], 0, torch.randn(2, HKV, D), "sparq", {"r": 4, "k": 8})


@pytest.mark.parametrize("k", [0, -1])
def test_sparq_with_k_below_1_raises_invalid_parameter(setup, unchanged, k):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match=f"k={k}"):
        client.attend([seq], 0, torch.randn(1, HKV, D), "sparq", {"r": 4, "k": k})


@pytest.mark.parametrize("local_window", [5, -1])
def test_sparq_with_local_window_outside_0_to_k_raises_invalid_parameter(setup, unchanged, local_window):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="local_window"):
        client.attend([seq], 0, torch.randn(1, HKV, D), "sparq", {"r": 4, "k": 4, "local_window": local_window})


@pytest.mark.parametrize("r", [4.0, "4"])
def test_sparq_with_a_non_int_r_raises_invalid_parameter(setup, unchanged, r):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="r="):
        client.attend([seq], 0, torch.randn(1, HKV, D), "sparq", {"r": r, "k": 4})


@pytest.mark.parametrize("top_pages", [0, -3, 2.5])
def test_quest_with_top_pages_below_1_raises_invalid_parameter(setup, unchanged, top_pages):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="top_pages"):
        client.attend([seq], 0, torch.randn(1, HKV, D), "quest", {"top_pages": top_pages})


# ---- attend with new_k / new_v -----------------------------------------------------------------


def test_attend_with_new_k_but_no_new_v_raises_invalid_parameter(setup, unchanged):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="new_k and new_v"):
        client.attend([seq], 0, torch.randn(1, HKV, D), new_k=torch.randn(1, HKV, D))


@pytest.mark.parametrize("shape", [(2, HKV, D), (1, HKV + 1, D), (1, 1, HKV, D)])
def test_attend_with_new_kv_of_a_wrong_shape_raises_shape_mismatch(setup, unchanged, shape):
    client, seq, _, gen = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="new_k has shape"):
        client.attend([seq], 0, torch.randn(1, HKV, D), new_k=torch.randn(shape), new_v=torch.randn(shape))


def test_attend_with_new_kv_in_another_dtype_raises_dtype_mismatch(setup, unchanged):
    client, seq, other, _ = setup
    new = torch.randn(2, HKV, D, dtype=torch.float16)
    with unchanged(client), pytest.raises(DTypeMismatch, match="dtype"):
        client.attend([seq, other], 0, torch.randn(2, HKV, D), new_k=new, new_v=new)


@pytest.mark.parametrize(
    "case",
    ["bad-query", "unknown-method", "unknown-parameter", "sparq-r-too-large", "unknown-second-sequence"],
)
def test_attend_with_new_kv_that_fails_validation_appends_nothing(setup, unchanged, case):
    client, seq, other, _ = setup
    q = torch.randn(2, HKV, D)
    ids, method, params = [seq, other], "dense", {}
    exc = InvalidParameter
    if case == "bad-query":
        q, exc = torch.randn(2, HKV, D + 8), ShapeMismatch
    elif case == "unknown-method":
        method = "nope"
    elif case == "unknown-parameter":
        params = {"bogus": 1}
    elif case == "sparq-r-too-large":
        method, params = "sparq", {"r": D + 1, "k": 2}
    else:
        ids, exc = [seq, "0123456789abcdef"], SequenceNotFound
    new = torch.randn(2, HKV, D)
    with unchanged(client), pytest.raises(exc):
        client.attend(ids, 0, q, method, params, new_k=new, new_v=new)


# ---- fetch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "what, index",
    [
        ("rows", [[0, 10], [1, 2]]),
        ("rows", [[0, 1], [-1, 2]]),
        ("rows", [[0, 1], [2, 100]]),
        ("columns", [[0, D], [1, 2]]),
        ("columns", [[-1, 0], [1, 2]]),
    ],
)
def test_fetch_with_an_index_out_of_range_raises_position_out_of_range(setup, unchanged, what, index):
    client, seq, _, _ = setup  # 10 positions, d = 16
    bound = 10 if what == "rows" else D
    with unchanged(client), pytest.raises(PositionOutOfRange, match=rf"out of range \[0, {bound}\)"):
        client.fetch(seq, 0, what, torch.tensor(index))


@pytest.mark.parametrize("index", [torch.tensor([0, 1]), torch.tensor([[0, 1]]), None])
@pytest.mark.parametrize("what", ["rows", "columns"])
def test_fetch_with_an_index_of_a_wrong_shape_raises_shape_mismatch(setup, unchanged, what, index):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="needs an index"):
        client.fetch(seq, 0, what, index)


def test_fetch_with_a_float_index_raises_shape_mismatch(setup, unchanged):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(ShapeMismatch, match="int32 or int64"):
        client.fetch(seq, 0, "rows", torch.zeros(HKV, 2))


@pytest.mark.parametrize("what", ["value_mean", "summaries"])
def test_fetch_of_an_unindexed_kind_with_an_index_raises_invalid_parameter(setup, unchanged, what):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="takes no index"):
        client.fetch(seq, 0, what, torch.zeros(HKV, 1, dtype=torch.long))


def test_fetch_of_an_unknown_kind_raises_invalid_parameter(setup, unchanged):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="unknown fetch kind 'keys'"):
        client.fetch(seq, 0, "keys")


@pytest.mark.parametrize("layer", [-1, L])
def test_fetch_at_a_layer_out_of_range_raises_invalid_parameter(setup, unchanged, layer):
    client, seq, _, _ = setup
    with unchanged(client), pytest.raises(InvalidParameter, match="layer"):
        client.fetch(seq, layer, "value_mean")
