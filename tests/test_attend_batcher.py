"""Attend requests arriving together on different streams: AttendBatcher's group commit, and the server's merge of
a batch into one store call (kvcache.service.server.KVCacheServicer._attend_batch)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from service_support import store_config

from kvcache.clients.inprocess import InProcessClient
from kvcache.clients.remote import RemoteClient
from kvcache.service.batcher import AttendBatcher
from kvcache.service.metrics import prometheus_text
from kvcache.service.server import KVCacheServicer, Server, ServerOptions
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.codec import from_wire, to_wire
from kvcache.wire.messages import params_to_wire

# ---- AttendBatcher --------------------------------------------------------------------------------------------


def _run_concurrently(batcher: AttendBatcher, requests: list, gate: threading.Event | None = None) -> list:
    answers: list = [None] * len(requests)

    def call(i: int) -> None:
        try:
            answers[i] = batcher.submit(requests[i])
        except Exception as exc:  # noqa: BLE001 -- the test looks at it
            answers[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    time.sleep(0.05)  # the first caller leads and blocks in run_batch; the others queue behind it
    for t in threads[1:]:
        t.start()
    time.sleep(0.1)
    if gate is not None:
        gate.set()
    for t in threads:
        t.join(10)
    return answers


def test_a_lone_caller_runs_its_request_on_its_own_thread():
    seen = []
    batcher = AttendBatcher(lambda reqs: seen.append((threading.get_ident(), list(reqs))) or [r * 2 for r in reqs])
    assert batcher.submit(21) == 42
    assert seen == [(threading.get_ident(), [21])]


def test_requests_that_arrive_during_a_batch_run_together_in_the_next():
    gate = threading.Event()
    batches = []

    def run(reqs):
        batches.append(list(reqs))
        if len(batches) == 1:
            gate.wait(10)
        return [f"answer {r}" for r in reqs]

    batcher = AttendBatcher(run)
    answers = _run_concurrently(batcher, list(range(5)), gate)
    assert answers == [f"answer {i}" for i in range(5)]  # each caller gets its own
    assert batches[0] == [0] and sorted(batches[1]) == [1, 2, 3, 4]
    assert (batcher.batches, batcher.requests) == (2, 5)


def test_max_batch_splits_the_waiting_requests():
    gate = threading.Event()
    batches = []
    batcher = AttendBatcher(lambda reqs: batches.append(list(reqs)) or (gate.wait(10), list(reqs))[1], max_batch=2)
    assert _run_concurrently(batcher, list(range(5)), gate) == list(range(5))
    assert [len(b) for b in batches] == [1, 2, 2]


def test_a_failing_batch_raises_in_each_of_its_callers_and_the_next_batch_runs():
    gate = threading.Event()
    calls = []

    def run(reqs):
        calls.append(list(reqs))
        if len(calls) == 1:
            gate.wait(10)
            raise RuntimeError("boom")
        return list(reqs)

    batcher = AttendBatcher(run)
    answers = _run_concurrently(batcher, [0, 1], gate)
    assert isinstance(answers[0], RuntimeError) and answers[1] == 1
    assert batcher.submit(7) == 7


# ---- the server's merge ---------------------------------------------------------------------------------------

CONFIG = store_config()  # 2 layers, 2 kv heads, d=16, pages of 4, float32
HQ = 4


def _twin_stores(lengths: list[int]) -> tuple[KVCacheServicer, InProcessClient, list[str], list[str]]:
    """A servicer and a plain client over equal stores holding sequences of `lengths`."""
    servicer, plain = KVCacheServicer(InProcessClient(CONFIG)), InProcessClient(CONFIG)
    ids = ([], [])
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        k, v = (torch.randn(CONFIG.num_layers, n, CONFIG.num_kv_heads, CONFIG.head_dim, generator=gen)
                for _ in range(2))
        for client, out in zip((servicer.client, plain), ids):
            seq = client.create().seq_id
            client.append(seq, k, v)
            out.append(seq)
    return servicer, plain, *ids


def _request(seq_ids, layer, method="dense", params=None, new=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, d = len(seq_ids), CONFIG.num_kv_heads, CONFIG.head_dim
    q = torch.randn(B, HQ, d, generator=gen)
    k, v = torch.randn(B, H, d, generator=gen), torch.randn(B, H, d, generator=gen)
    request = pb.AttendRequest(seq_ids=list(seq_ids), layer=layer, q=to_wire(q), method=method,
                               params=params_to_wire(params) if params else None,
                               new_k=to_wire(k) if new else None, new_v=to_wire(v) if new else None)
    return request, (q, k, v) if new else (q, None, None)


def _check(response, plain, seqs, layer, tensors, method="dense", params=None):
    q, k, v = tensors
    assert not response.error_code, response.error_message
    want = plain.attend(seqs, layer, q, method, params, new_k=k, new_v=v)
    torch.testing.assert_close(from_wire(response.out), want.out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_wire(response.lse), want.lse, rtol=1e-6, atol=1e-6)
    assert response.bytes_read == want.bytes_read


def test_a_batch_of_compatible_requests_is_one_store_call_with_each_answer_its_own():
    servicer, plain, s, p = _twin_stores([5, 9, 4, 13, 7])
    calls = []
    inner = servicer.client.attend
    servicer.client.attend = lambda ids, *a, **kw: calls.append(list(ids)) or inner(ids, *a, **kw)
    made = [_request([s[0]], 1, seed=1), _request([s[1], s[2]], 1, seed=2), _request([s[3]], 1, seed=3),
            _request([s[4]], 0, seed=4),  # another layer: a call of its own
            _request([s[0]], 1, "sparq", {"r": 4, "k": 3}, seed=5)]  # s0 again, another method: alone, after
    responses = servicer._attend_batch([r for r, _ in made])
    assert calls == [[s[0], s[1], s[2], s[3]], [s[4]], [s[0]]]
    assert (servicer.batcher.merged_calls, servicer.batcher.merged_requests) == (1, 3)
    twins = [[p[0]], [p[1], p[2]], [p[3]], [p[4]], [p[0]]]
    for (request, tensors), response, seqs in zip(made, responses, twins):
        method = request.method
        params = {"r": 4, "k": 3} if method == "sparq" else None
        _check(response, plain, seqs, request.layer, tensors, method, params)
    assert servicer.client.store.lengths(s, 1) == [5 + 2, 9 + 1, 4 + 1, 13 + 1, 7]  # s0 twice, once per request


def test_a_rejected_request_in_a_batch_fails_alone_and_the_others_are_answered_once():
    servicer, plain, s, p = _twin_stores([5, 9, 6])
    bad_q = _request([s[2]], 1, seed=9)[0]
    bad_q.q.CopyFrom(to_wire(torch.randn(1, HQ + 1, CONFIG.head_dim)))  # Hq not a multiple of Hkv
    made = [_request([s[0]], 1, seed=1), _request(["0" * 32], 1, seed=2), _request([s[1]], 1, seed=3)]
    responses = servicer._attend_batch([made[0][0], made[1][0], bad_q, made[2][0]])
    assert responses[1].error_class == "SequenceNotFound"
    assert responses[2].error_class == "ShapeMismatch"
    _check(responses[0], plain, [p[0]], 1, made[0][1])
    _check(responses[3], plain, [p[1]], 1, made[2][1])
    assert servicer.client.store.lengths(s, 1) == [6, 10, 6]  # appended once each; the rejected one not at all


def test_a_request_the_merged_call_rejects_is_answered_alone_and_nothing_is_written_twice():
    servicer, plain, s, p = _twin_stores([20, 3, 8])
    sparq = {"r": 4, "k": 6}  # k = 6 is more than the short sequence holds (3 + 1)
    made = [_request([s[0]], 1, "sparq", sparq, seed=1), _request([s[1]], 1, "sparq", sparq, seed=2),
            _request([s[2]], 1, "sparq", sparq, seed=3)]
    half = _request([s[2]], 0, seed=4)[0]
    half.new_k.CopyFrom(to_wire(torch.randn(1, CONFIG.num_kv_heads, CONFIG.head_dim).half()))  # float16 k
    responses = servicer._attend_batch([r for r, _ in made] + [half, _request([s[0]], 0, seed=5)[0]])
    assert responses[1].error_class == "InvalidParameter"
    assert responses[3].error_class == "DTypeMismatch"  # not promoted to float32 by a merge
    _check(responses[0], plain, [p[0]], 1, made[0][1], "sparq", sparq)
    _check(responses[2], plain, [p[2]], 1, made[2][1], "sparq", sparq)
    assert not responses[4].error_code
    assert servicer.client.store.lengths(s, 1) == [21, 3, 9]
    assert servicer.client.store.lengths(s, 0) == [21, 3, 8]


def test_a_sequence_named_by_two_requests_of_a_batch_is_attended_twice_in_order():
    servicer, plain, s, p = _twin_stores([5, 7])
    made = [_request([s[0], s[1]], 0, seed=1), _request([s[1]], 0, seed=2)]
    responses = servicer._attend_batch([r for r, _ in made])
    _check(responses[0], plain, p, 0, made[0][1])
    _check(responses[1], plain, [p[1]], 0, made[1][1])
    assert servicer.client.store.lengths(s, 0) == [6, 9]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_concurrent_streams_on_a_real_server_are_merged_and_answered_as_alone(device):
    config = store_config(device=device)
    server = Server(config, ServerOptions(port=0, workers=8, grace_seconds=0))
    servicer = server.servicer
    inner = servicer.client.attend

    def slow_attend(*args, **kwargs):  # long enough that the other streams' requests queue behind each call
        time.sleep(0.02)
        return inner(*args, **kwargs)

    servicer.client.attend = slow_attend
    server.start()
    plain = InProcessClient(config)
    try:
        clients = [RemoteClient(f"127.0.0.1:{server.port}") for _ in range(4)]
        seqs, twins, gen = [], [], torch.Generator().manual_seed(0)
        for client in clients:
            k, v = (torch.randn(CONFIG.num_layers, 6, CONFIG.num_kv_heads, CONFIG.head_dim, generator=gen)
                    for _ in range(2))
            seqs.append(client.create().seq_id)
            client.append(seqs[-1], k, v)
            twins.append(plain.create().seq_id)
            plain.append(twins[-1], k, v)
        steps, results = 6, [[] for _ in clients]
        inputs = [[_request([seqs[i]], step % 2, seed=100 * i + step)[1] for step in range(steps)]
                  for i in range(len(clients))]
        barrier = threading.Barrier(len(clients))

        def engine(i: int) -> None:
            barrier.wait()
            for step, (q, k, v) in enumerate(inputs[i]):
                results[i].append(clients[i].attend([seqs[i]], step % 2, q, new_k=k, new_v=v))

        threads = [threading.Thread(target=engine, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert servicer.batcher.requests == len(clients) * steps
        assert servicer.batcher.batches < servicer.batcher.requests  # some requests shared a batch
        batching = clients[0].stats()["batching"]  # over the wire, and in the Prometheus text
        assert batching == servicer.batcher.counts()
        assert batching["requests"] == len(clients) * steps
        assert batching["merged_requests"] >= 2 * batching["merged_calls"]
        assert f'kvcache_attend_batching_total{{kind="requests"}} {float(len(clients) * steps)}' in prometheus_text(
            servicer.stats())
        for i in range(len(clients)):
            for step, (q, k, v) in enumerate(inputs[i]):
                want = plain.attend([twins[i]], step % 2, q, new_k=k, new_v=v)
                # On CUDA a merged batch may split the positions differently: float32 sums in another order.
                torch.testing.assert_close(results[i][step].out, want.out.cpu(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(results[i][step].lse, want.lse.cpu(), rtol=1e-5, atol=1e-5)
                assert results[i][step].bytes_read == want.bytes_read
        for client in clients:
            client.close()
    finally:
        server.grpc.stop(0).wait()


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_must_be_positive(max_batch):
    with pytest.raises(ValueError, match="max_batch"):
        AttendBatcher(lambda reqs: reqs, max_batch=max_batch)


def test_a_lone_request_is_answered_as_a_batch_of_one_without_grouping():
    servicer, plain, s, p = _twin_stores([5, 9])
    servicer.client.attend_many = None  # a lone request must not go through the grouping
    made = _request([s[0]], 1, seed=1)
    _check(servicer._attend_batch([made[0]])[0], plain, [p[0]], 1, made[1])
    assert servicer._attend_batch([_request(["0" * 32], 1, seed=2)[0]])[0].error_class == "SequenceNotFound"
    bad_q = _request([s[1]], 1, seed=3)[0]
    bad_q.q.CopyFrom(to_wire(torch.randn(1, HQ + 1, CONFIG.head_dim)))
    assert servicer._attend_batch([bad_q])[0].error_class == "ShapeMismatch"
    assert servicer.client.store.lengths(s, 1) == [6, 9]  # the rejected ones wrote nothing
    assert (servicer.batcher.merged_calls, servicer.batcher.merged_requests) == (0, 0)


def test_a_lone_request_that_fails_unexpectedly_is_answered_internal_and_releases_its_sequence():
    servicer, _, s, _ = _twin_stores([5])
    servicer.client.attend = lambda *a, **kw: 1 / 0
    response = servicer._attend_batch([_request([s[0]], 1)[0]])[0]
    assert (response.error_class, response.error_code) == ("RemoteError", grpc.StatusCode.INTERNAL.value[0])
    assert len(servicer.locks) == 0


@pytest.mark.service
def test_two_streams_taking_turns_are_each_answered_as_alone():
    server = Server(store_config(), ServerOptions(port=0, workers=8, grace_seconds=0))
    server.start()
    plain = InProcessClient(store_config())
    try:
        clients = [RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0, data_plane="grpc")
                   for _ in range(2)]
        gen = torch.Generator().manual_seed(0)
        k, v = (torch.randn(2, 7, 2, 16, generator=gen) for _ in range(2))
        pairs = []
        for client in clients:
            remote, local = client.create().seq_id, plain.create().seq_id
            client.append(remote, k, v)
            plain.append(local, k, v)
            pairs.append((client, remote, local))
        for step in range(3):
            for client, remote, local in pairs:
                q, row = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 2, 16, generator=gen)
                got = client.attend([remote], step % 2, q, new_k=row, new_v=row)
                want = plain.attend([local], step % 2, q, new_k=row, new_v=row)
                torch.testing.assert_close(got.out, want.out, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got.lse, want.lse, rtol=1e-6, atol=1e-6)
        assert server.servicer.stats()["batching"]["requests"] == 6
        for client in clients:
            client.close()
    finally:
        server.drain_and_stop()
