"""Plan once per step, run per layer: a planned decode step gives what per-call attends give, builds its page table
once, and refuses to run once the plan no longer describes its sequences."""

from __future__ import annotations

import pytest
import torch
from service_support import DEFAULT_STORE_FLAGS, serving, store_config
from twin_stores import twin_clients

from kvcache import InProcessClient, InvalidParameter, RemoteClient
from kvcache.errors import PlanStale
from kvcache.methods.gate_model import GateShape
from kvcache.store import kv_store

L, HKV, D, P, G = 3, 2, 16, 4, 2
METHODS = [
    ("dense", {}),
    ("sparq", {"r": 4, "k": 6, "local_window": 2}),
    ("quest", {"top_pages": 2}),
    ("gate", {"budget": 8}),
    ("oracle", {"budget": 8}),
    ("window", {"window": 5, "sinks": 2}),
]


def _twin_clients(lengths, seed=0):
    """Two stores holding the same K/V: one decodes planned, the other per call."""
    return twin_clients(GateShape(L, HKV, G, D, P), lengths, seed, gate_seed=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lengths", [(8,), (7, 12, 9)])  # a new page at once (8, 12), mid-page (7, 9), mixed
def test_a_planned_step_equals_per_call_steps_for_every_method(lengths, backend):
    (planned, per_call), (ids_p, ids_c) = _twin_clients(lengths)
    gen = torch.Generator().manual_seed(3)
    for step in range(2):  # the second step runs on pages the first one filled
        for method, params in METHODS:
            if backend == "triton" and method in ("gate", "oracle") and step:
                continue  # the interpreter is slow: one step of these is enough
            plan = planned.plan_step(ids_p)
            for layer in range(L):
                q = torch.randn((len(lengths), HKV * G, D), generator=gen)
                k, v = torch.randn((2, len(lengths), HKV, D), generator=gen)
                want = per_call.attend(ids_c, layer, q, method, params, new_k=k, new_v=v, backend=backend)
                got = planned.attend(ids_p, layer, q, method, params, new_k=k, new_v=v, backend=backend, plan=plan)
                torch.testing.assert_close(got.out, want.out, msg=f"{method} step {step} layer {layer}")
                torch.testing.assert_close(got.lse, want.lse, msg=f"{method} step {step} layer {layer}")
                assert got.bytes_read == want.bytes_read, (method, step, layer)
    assert [planned.describe(s).lengths for s in ids_p] == [per_call.describe(s).lengths for s in ids_c]


def test_a_plan_without_new_tokens_serves_attends_that_append_nothing():
    (a, b), (ids_a, ids_b) = _twin_clients((10, 5))
    plan = a.plan_step(ids_a, new_tokens=0)
    q = torch.randn((2, HKV * G, D))
    for layer in range(L):
        want = b.attend(ids_b, layer, q, "quest", {"top_pages": 2})
        got = a.attend(ids_a, layer, q, "quest", {"top_pages": 2}, plan=plan)
        torch.testing.assert_close(got.out, want.out)
    with pytest.raises(PlanStale, match="append"):
        a.attend(ids_a, 0, q, new_k=torch.zeros((2, HKV, D)), new_v=torch.zeros((2, HKV, D)), plan=plan)


def test_the_page_table_is_built_once_per_planned_step(monkeypatch):
    (client, _), (ids, _) = _twin_clients((6, 11))
    built = []
    real = kv_store.build_csr
    monkeypatch.setattr(kv_store, "build_csr", lambda *a, **kw: built.append(1) or real(*a, **kw))
    q, k = torch.randn((2, HKV * G, D)), torch.randn((2, HKV, D))
    plan = client.plan_step(ids)
    for layer in range(L):
        client.attend(ids, layer, q, new_k=k, new_v=k, plan=plan)
    assert len(built) == 1
    for layer in range(L):
        client.attend(ids, layer, q, new_k=k, new_v=k)
    assert len(built) == 1 + L


def test_a_plan_goes_stale_when_its_sequences_change_outside_the_step():
    (client, _), (ids, _) = _twin_clients((7, 9))
    q, k = torch.randn((2, HKV * G, D)), torch.randn((2, HKV, D))

    def step_layer(plan, layer=0):
        return client.attend(ids, layer, q, new_k=k, new_v=k, plan=plan)

    plan = client.plan_step(ids)
    client.fork(ids[0])  # its pages become shared: the step's last page would be copied on write
    with pytest.raises(PlanStale, match="changed"):
        step_layer(plan)
    plan = client.plan_step(ids)  # planned again: the copy is made now
    step_layer(plan, 0)
    with pytest.raises(PlanStale, match="changed"):
        step_layer(plan, 0)  # layer 0 already has this step's token
    with pytest.raises(PlanStale, match="other sequences"):
        client.attend(ids[::-1], 1, q, new_k=k, new_v=k, plan=plan)
    client.free(ids[1])
    with pytest.raises(PlanStale, match="freed"):
        step_layer(plan, 1)


def test_a_step_is_planned_between_steps_with_zero_or_one_new_token():
    (client, _), (ids, _) = _twin_clients((7,))
    with pytest.raises(InvalidParameter, match="0 or 1"):
        client.plan_step(ids, new_tokens=2)
    client.attend(ids, 0, torch.randn((1, HKV * G, D)), new_k=torch.zeros((1, HKV, D)), new_v=torch.zeros((1, HKV, D)))
    with pytest.raises(InvalidParameter, match="part way through a step"):
        client.plan_step(ids)
    with pytest.raises(InvalidParameter, match="twice"):
        client.plan_step(ids + ids)


def test_a_planned_step_of_a_fork_copies_the_shared_page_once_and_leaves_the_parent_as_it_was():
    (client, _), (ids, _) = _twin_clients((6,))
    parent = ids[0]
    child = client.fork(parent).seq_id
    before = client.store.page_keys(0, client.store.page_table([parent], 0).indices.cpu()).clone()
    plan = client.plan_step([child])
    k = torch.randn((1, HKV, D))
    for layer in range(L):
        client.attend([child], layer, torch.randn((1, HKV * G, D)), new_k=k, new_v=k, plan=plan)
    assert client.describe(child).lengths == (7,) * L and client.describe(parent).lengths == (6,) * L
    after = client.store.page_keys(0, client.store.page_table([parent], 0).indices.cpu())
    assert torch.equal(before, after)


@pytest.mark.service
def test_over_grpc_a_planned_step_answers_as_in_process_and_an_unknown_plan_is_failed_precondition():
    local = InProcessClient(store_config())
    gen = torch.Generator().manual_seed(9)
    k, v = torch.randn((2, 13, 2, 16), generator=gen), torch.randn((2, 13, 2, 16), generator=gen)
    with serving(*DEFAULT_STORE_FLAGS) as server, RemoteClient(server.target, timeout=20) as remote:
        ids = []
        for c in (local, remote):
            ids.append(c.create().seq_id)
            c.append(ids[-1], k, v)
        for c, sid in ((local, ids[0]), (remote, ids[1])):
            plan = c.plan_step([sid])
            outs = []
            for layer in range(2):
                q = torch.ones((1, 4, 16)) * (layer + 1)
                row = torch.full((1, 2, 16), 0.5)
                outs.append(c.attend([sid], layer, q, "sparq", {"r": 4, "k": 6}, new_k=row, new_v=row, plan=plan).out)
            if c is local:
                want = outs
            else:
                for got, expected in zip(outs, want):
                    torch.testing.assert_close(got, expected)
        bogus = remote.plan_step([ids[1]])
        object.__setattr__(bogus, "step_id", "no-such-step")
        with pytest.raises(PlanStale, match="plan the step again"):
            remote.attend([ids[1]], 0, torch.ones((1, 4, 16)), plan=bogus, new_k=row, new_v=row)
        assert remote.describe(ids[1]).lengths == (14, 14)  # the refused call appended nothing
