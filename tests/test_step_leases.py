"""Step leases of the store (KVStore.lease_step / commit_lease / abort_lease): a step planned for rows another process
writes in the pool, its sequences held against every other change until it is committed, aborted or runs out."""

from __future__ import annotations

import time

import pytest
import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter, PlanStale, SequenceLeased
from kvcache.store import KVStore

L, HKV, D, P = 2, 2, 8, 4


def _store() -> KVStore:
    return KVStore(KVCacheConfig(L, HKV, D, page_size=P, dtype=torch.float32, device="cpu", device_pages=32))


def _sequence(store: KVStore, n: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    sid = store.create().seq_id
    store.append(sid, torch.randn((L, n, HKV, D), generator=gen), torch.randn((L, n, HKV, D), generator=gen))
    return sid


def _write_rows(store: KVStore, lease, k: torch.Tensor, v: torch.Tensor, sums: torch.Tensor) -> None:
    """What an engine does on the mapped pool: each layer's new row written, the value sums moved on."""
    rows = store._row_targets(lease.seqs, lease.plan.start_lengths)
    for layer in range(L):
        store.pool.append_rows(layer, k[layer], v[layer], rows)
    sums += v.float().transpose(0, 1)


@pytest.mark.parametrize("n", [3, P, P + 1])
def test_a_committed_lease_leaves_the_store_as_an_append_of_the_same_rows(n):
    leased, appended = _store(), _store()
    a, b = _sequence(leased, n), _sequence(appended, n)
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn((L, 1, HKV, D), generator=gen), torch.randn((L, 1, HKV, D), generator=gen)
    lease = leased.lease_step([a], 5.0)
    sums = torch.stack([s.value_sum.clone() for s in lease.seqs])
    _write_rows(leased, lease, k, v, sums)
    leased.commit_lease(lease, sums)
    appended.append(b, k, v)
    assert leased.describe(a).lengths == appended.describe(b).lengths == (n + 1,) * L
    for layer in range(L):
        assert torch.equal(leased.value_mean([a], layer), appended.value_mean([b], layer))
        pa, pb = leased.page_table([a], layer).indices.long(), appended.page_table([b], layer).indices.long()
        assert torch.equal(leased.pool.k_summary[layer, pa], appended.pool.k_summary[layer, pb])
        every = torch.arange(n + 1).expand(HKV, -1)
        for got, want in zip(leased.read_positions(a, layer, every), appended.read_positions(b, layer, every)):
            assert torch.equal(got, want)
    assert len(leased.leases) == 0


def test_a_leased_sequence_refuses_changes_and_an_aborted_lease_restores_its_summaries():
    store = _store()
    sid, other = _sequence(store, 6), _sequence(store, 2, seed=1)
    page = store.page_table([sid], 0).indices.long()[-1]
    before = store.pool.k_summary[:, page].clone()
    lease = store.lease_step([sid], 5.0)
    with pytest.raises(InvalidParameter):
        store.lease_step([other, other], 5.0)
    for change in (lambda: store.fork(sid), lambda: store.free(sid), lambda: store.plan_step([sid]),
                   lambda: store.append(sid, torch.zeros((L, 1, HKV, D)), torch.zeros((L, 1, HKV, D))),
                   lambda: store.append_tokens([sid], torch.zeros((1, HKV, D)), torch.zeros((1, HKV, D)), 0)):
        with pytest.raises(SequenceLeased):
            change()
    store.fork(other)  # the others are free
    _write_rows(store, lease, torch.full((L, 1, HKV, D), 9.0), torch.ones((L, 1, HKV, D)), torch.zeros(1, L, HKV, D))
    assert not torch.equal(store.pool.k_summary[:, page], before)
    store.abort_lease(lease)
    assert torch.equal(store.pool.k_summary[:, page], before)
    assert store.describe(sid).lengths == (6, 6)
    with pytest.raises(PlanStale, match="ended before its commit"):
        store.commit_lease(lease, torch.zeros(1, L, HKV, D))
    store.fork(sid)


def test_a_lease_past_its_deadline_gives_way_to_the_next_change_and_cannot_be_committed():
    store = _store()
    sid = _sequence(store, 5)
    lease = store.lease_step([sid], 0.05)
    with pytest.raises(InvalidParameter):
        store.lease_step([sid], 0.0)
    time.sleep(0.1)
    assert store.leases.overdue() == [lease]
    store.append(sid, torch.zeros((L, 1, HKV, D)), torch.zeros((L, 1, HKV, D)))  # aborts the lease first
    assert store.describe(sid).lengths == (6, 6) and len(store.leases) == 0
    with pytest.raises(PlanStale):
        store.commit_lease(lease, torch.zeros(1, L, HKV, D))
    late = store.lease_step([sid], 0.05)
    time.sleep(0.1)
    assert store.end_overdue_leases() == 1 and not store.leases.holds(late)


def test_an_expired_sequence_under_a_live_step_lease_waits_for_the_lease():
    store = _store()
    sid = store.create(lease_seconds=0.01).seq_id
    store.append(sid, torch.zeros((L, 2, HKV, D)), torch.zeros((L, 2, HKV, D)))
    lease = store.lease_step([sid], 5.0)
    time.sleep(0.05)
    assert not store.free_if_expired(sid)
    store.abort_lease(lease)
    assert store.free_if_expired(sid, now=time.monotonic() + 1)


def test_a_lease_of_several_steps_commits_the_steps_written_and_gives_back_the_pages_of_the_rest():
    leased, appended = _store(), _store()
    n = 3
    a, b = _sequence(leased, n), _sequence(appended, n)
    free = leased.allocator.num_free
    lease = leased.lease_step([a], 5.0, steps=2 * P)
    with pytest.raises(InvalidParameter):  # more steps than the lease holds: the whole lease is aborted
        leased.commit_lease(lease, torch.stack([s.value_sum.clone() for s in lease.seqs]), 2 * P + 1)
    assert leased.describe(a).lengths == (n,) * L and leased.allocator.num_free == free
    lease = leased.lease_step([a], 5.0, steps=2 * P)
    assert lease.steps == 2 * P and leased.describe(a).num_pages == -(-(n + 2 * P) // P)
    assert leased.allocator.num_free == free - (-(-(n + 2 * P) // P) - -(-n // P))
    sums = torch.stack([s.value_sum.clone() for s in lease.seqs])
    gen = torch.Generator().manual_seed(7)
    rows = []
    for step in range(3):  # three whole steps, crossing from page 0 into page 1
        k, v = torch.randn((L, 1, HKV, D), generator=gen), torch.randn((L, 1, HKV, D), generator=gen)
        targets = leased._row_targets(lease.seqs, [n + step])
        for layer in range(L):
            leased.pool.append_rows(layer, k[layer], v[layer], targets)
        sums += v.float().transpose(0, 1)
        rows.append((k, v))
    told = []
    leased.summary_listeners.append(lambda layers, pages, at, fills: told.append((at.tolist(), fills)))
    leased.commit_lease(lease, sums, 3)
    for k, v in rows:
        appended.append(b, k, v)
    assert leased.describe(a).lengths == appended.describe(b).lengths == (n + 3,) * L
    assert leased.describe(a).num_pages == appended.describe(b).num_pages == -(-(n + 3) // P)
    assert leased.allocator.num_free == free - (-(-(n + 3) // P) - -(-n // P))
    assert told == [([0], [P]), ([1], [n + 3 - P])]  # each page the steps touched, with its rows now
    for layer in range(L):
        assert torch.equal(leased.value_mean([a], layer), appended.value_mean([b], layer))
        pa, pb = leased.page_table([a], layer).indices.long(), appended.page_table([b], layer).indices.long()
        assert torch.equal(leased.pool.k_summary[layer, pa], appended.pool.k_summary[layer, pb])


def test_a_lease_gets_one_step_where_the_free_pages_hold_no_more_and_refuses_a_count_that_is_not_one_or_more():
    store = _store()
    sid = _sequence(store, P)  # its next position opens a page
    hog = store.create().seq_id
    store.append(hog, *(torch.zeros((L, (store.allocator.num_free - 1) * P, HKV, D)),) * 2)
    lease = store.lease_step([sid], 5.0, steps=8)
    assert lease.steps == 1 and store.allocator.num_free == 0
    store.abort_lease(lease)
    assert store.allocator.num_free == 1 and store.describe(sid).num_pages == 1  # the page it opened went back
    for steps in (0, -1, True, 1.5):
        with pytest.raises(InvalidParameter):
            store.lease_step([sid], 5.0, steps=steps)
