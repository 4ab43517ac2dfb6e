"""A decode step checked and planned once (kvcache.methods.decode_step.DecodeStep, client.begin_step) gives what the
per-call path gives, for every method and both backends: outputs, lse, bytes, and the K/V left in the store, over
several steps that cross page boundaries, with sequences of different lengths; and it refuses what changed under
it."""

from __future__ import annotations

import pytest
import torch
from twin_stores import twin_clients

from kvcache import ShapeMismatch
from kvcache.errors import DTypeMismatch, PlanStale
from kvcache.methods.gate_model import GateShape

L, HKV, G, D, P = 2, 2, 2, 16, 4
METHODS = [("dense", {}), ("sparq", {"r": 8, "k": 6}), ("quest", {"top_pages": 2}), ("gate", {"budget": 8}),
           ("oracle", {"budget": 8}), ("window", {"window": 6, "sinks": 2})]


def _twin_clients(lengths, seed=0):
    """Two stores holding the same sequences (one per length), and their ids."""
    return twin_clients(GateShape(L, HKV, G, D, P, gate_dim=8, rope_base=100.0), lengths, seed, gate_seed=seed)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method,params", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("lengths", [[7], [5, 9, 12]], ids=["one", "three"])
def test_a_planned_step_equals_the_per_call_path(method, params, lengths, backend):
    (planned, per_call), (ids_a, ids_b) = _twin_clients(lengths)
    gen = torch.Generator().manual_seed(1)
    B = len(lengths)
    steps = 5 if backend == "torch" else 3  # new pages opened at positions 8 and 12 (the interpreter is slow)
    for _ in range(steps):
        step = planned.begin_step(ids_a, HKV * G, method, params, backend=backend)
        plan = per_call.plan_step(ids_b)
        for layer in range(L):
            q = torch.randn((B, HKV * G, D), generator=gen)
            k, v = torch.randn((2, B, HKV, D), generator=gen)
            got = step.attend(layer, q, k, v)
            want = per_call.attend(ids_b, layer, q, method, params, new_k=k, new_v=v, backend=backend, plan=plan)
            torch.testing.assert_close(got.out, want.out, rtol=0, atol=0)
            torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=0)
            assert got.bytes_read == want.bytes_read
    for a, b in zip(ids_a, ids_b):
        assert planned.describe(a).lengths == per_call.describe(b).lengths
        n = planned.describe(a).length
        index = torch.arange(n).expand(HKV, n)
        for layer in range(L):
            got, want = planned.fetch(a, layer, "rows", index), per_call.fetch(b, layer, "rows", index)
            assert all(torch.equal(x, y) for x, y in zip(got.tensors, want.tensors))
        for layer in range(L):
            torch.testing.assert_close(planned.fetch(a, layer, "value_mean").tensors[0],
                                       per_call.fetch(b, layer, "value_mean").tensors[0])
    assert planned.stats()["methods"][method]["calls"] == steps * L


def test_each_layer_may_run_its_own_method():
    (planned, per_call), (ids_a, ids_b) = _twin_clients([9, 5])
    q, k = torch.randn((2, HKV * G, D)), torch.randn((2, HKV, D))
    step = planned.begin_step(ids_a, HKV * G, "quest", {"top_pages": 1}, layer_methods={1: ("dense", None)})
    plan = per_call.plan_step(ids_b)
    for layer, (method, params) in enumerate([("quest", {"top_pages": 1}), ("dense", None)]):
        got = step.attend(layer, q, k, k)
        want = per_call.attend(ids_b, layer, q, method, params, new_k=k, new_v=k, plan=plan)
        assert torch.equal(got.out, want.out)


def test_a_sequence_freed_or_forked_during_the_step_makes_it_stale():
    (client, _), (ids, _) = _twin_clients([9, 5])
    q, k = torch.randn((2, HKV * G, D)), torch.randn((2, HKV, D))
    step = client.begin_step(ids, HKV * G)
    step.attend(0, q, k, k)
    client.fork(ids[0])
    with pytest.raises(PlanStale, match="changed"):
        step.attend(1, q, k, k)
    (client, _), (ids, _) = _twin_clients([9, 5])
    step = client.begin_step(ids, HKV * G)
    client.free(ids[1])
    with pytest.raises(PlanStale):
        step.attend(0, q, k, k)


def test_a_layer_written_twice_and_bad_tensors_are_refused_and_change_nothing():
    (client, _), (ids, _) = _twin_clients([9])
    q, k = torch.randn((1, HKV * G, D)), torch.randn((1, HKV, D))
    step = client.begin_step(ids, HKV * G)
    with pytest.raises(ShapeMismatch):
        step.attend(0, torch.randn((1, HKV * G + 1, D)), k, k)
    with pytest.raises(DTypeMismatch):
        step.attend(0, q.double(), k, k)
    assert client.describe(ids[0]).lengths == (9, 9)
    step.attend(0, q, k, k)
    with pytest.raises(PlanStale, match="written already"):
        step.attend(0, q, k, k)
    assert client.describe(ids[0]).lengths == (10, 9)


def test_the_step_is_checked_before_any_page_is_taken():
    (client, _), (ids, _) = _twin_clients([3])
    free = client.stats()["pool"]["pages_free"]
    with pytest.raises(Exception, match="k=6"):  # SparQ's k above the 4 positions the step would hold
        client.begin_step(ids, HKV * G, "sparq", {"r": 8, "k": 6})
    with pytest.raises(ShapeMismatch):
        client.begin_step(ids, HKV * G + 1)
    assert client.stats()["pool"]["pages_free"] == free
