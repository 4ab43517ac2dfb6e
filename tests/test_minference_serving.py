"""MInference served by the KV manager: per-head patterns, the SparseIndex and SparsePrefill calls of
InProcessClient and RemoteClient (against one `kvcache serve` subprocess), and their status codes."""

from __future__ import annotations

import grpc
import pytest
import torch
import torch.nn.functional as F
from service_support import STORE, start_server, store_config

from kvcache import InProcessClient, KVCacheConfig
from kvcache.clients.remote import RemoteClient
from kvcache.errors import DTypeMismatch, InvalidParameter, PositionOutOfRange, SequenceNotFound, ShapeMismatch
from kvcache.prefill.minference import minference_prefill
from kvcache.prefill.minference_index import a_shape_index, block_sparse_index, vertical_slash_index
from kvcache.prefill.serving import (
    CAUSAL,
    HeadPattern,
    build_index,
    index_pairs,
    paged,
    sparse_attention,
)
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire import kvcache_pb2_grpc as pb_grpc
from kvcache.wire.codec import to_wire

L, HKV, D = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"]
HQ = 2 * HKV
B = 16  # index block size of these tests: a 100-position prompt has 7 blocks
S = 100
A_SHAPE = HeadPattern("a_shape", n_init=16, n_local=32)
VERTICAL_SLASH = HeadPattern("vertical_slash", n_vertical=30, n_slash=50)
BLOCK_SPARSE = HeadPattern("block_sparse", top_k=3)
MIXED = [A_SHAPE, VERTICAL_SLASH, BLOCK_SPARSE, CAUSAL]  # one per query head


@pytest.fixture(scope="module")
def server():
    s = start_server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def clients(server):
    """An in-process client and a remote one, each holding the same random prompt of S positions (all layers)."""
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn((L, S, HKV, D), generator=gen), torch.randn((L, S, HKV, D), generator=gen)
    local = InProcessClient(store_config())
    remote = RemoteClient(server.target, timeout=20)
    seqs = {}
    for name, c in (("in-process", local), ("remote", remote)):
        seqs[name] = c.create().seq_id
        c.append(seqs[name], k, v)
    yield {"in-process": (local, seqs["in-process"]), "remote": (remote, seqs["remote"]), "kv": (k, v)}
    remote.close()


def chunk_q(T: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn((T, HQ, D), generator=torch.Generator().manual_seed(seed))


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [T, Hq, d] at [start, start+T) over k, v [start+T, Hkv, d], exactly (SDPA)."""
    n = start + q.shape[0]
    keys = k[:n].transpose(0, 1).repeat_interleave(HQ // HKV, dim=0)
    values = v[:n].transpose(0, 1).repeat_interleave(HQ // HKV, dim=0)
    visible = torch.arange(n)[None, :] <= torch.arange(start, n)[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=visible).transpose(0, 1)


# ---- patterns and a layer's index ----------------------------------------------------------------------


def test_a_head_pattern_names_its_sizes_and_round_trips_through_its_dict():
    p = HeadPattern("vertical_slash", n_vertical=100, n_slash=750)
    assert p.label == "vertical_slash(100, 750)"
    assert HeadPattern.from_dict({**p.to_dict(), "recall": 0.9}) == p
    with pytest.raises(InvalidParameter, match="unknown"):
        HeadPattern("dilated")
    with pytest.raises(InvalidParameter, match="n_local"):
        HeadPattern("a_shape", n_init=4)
    with pytest.raises(InvalidParameter, match="non-negative"):
        HeadPattern("block_sparse", top_k=-1)


def test_each_head_gets_the_index_of_its_own_pattern():
    gen = torch.Generator().manual_seed(3)
    k = torch.randn((S, HKV, D), generator=gen)
    q = chunk_q()
    start = S - q.shape[0]
    k_seq, _, csr = paged(k, k, page_size=8)
    index = build_index(q, k_seq, csr, start, MIXED, block_size=B)
    alone = [a_shape_index(q, start, n_init=16, n_local=32, block_size=B),
             vertical_slash_index(q, k_seq, csr, start, n_vertical=30, n_slash=50, block_size=B),
             block_sparse_index(q, k_seq, csr, start, top_k=3, block_size=B)]
    for h, ix in enumerate(alone):
        assert torch.equal(index.mask(h), ix.mask(h)), f"head {h}"
    assert index.mask(3).sum() == sum(range(start + 1, S + 1))  # causal: every pair


def test_pairs_counted_from_the_index_equal_those_of_its_mask():
    gen = torch.Generator().manual_seed(4)
    k = torch.randn((S, HKV, D), generator=gen)
    for start, T in ((0, S), (S - 37, 37)):  # a chunk from 0, and one starting mid-block
        q = chunk_q(T)
        k_seq, _, csr = paged(k[: start + T], k[: start + T], page_size=8)
        index = build_index(q, k_seq, csr, start, [A_SHAPE, CAUSAL, BLOCK_SPARSE, A_SHAPE], block_size=B)
        pairs, causal = index_pairs(index)
        assert pairs == sum(int(index.mask(h).sum()) for h in range(HQ))
        assert causal == HQ * sum(range(start + 1, start + T + 1))


def test_sparse_attention_with_causal_patterns_is_dense_causal_attention():
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn((S, HKV, D), generator=gen), torch.randn((S, HKV, D), generator=gen)
    q = chunk_q(S - 30)
    k_seq, v_seq, csr = paged(k, v, page_size=B)
    index = build_index(q, k_seq, csr, 30, CAUSAL, block_size=B)
    out, _ = sparse_attention(q, k_seq, v_seq, csr, index)
    torch.testing.assert_close(out, dense_causal(q, k, v, 30), rtol=1e-5, atol=1e-5)


# ---- served: in-process and over gRPC -------------------------------------------------------------------


def test_served_index_is_built_from_the_keys_the_store_holds(clients):
    client, seq = clients["in-process"]
    k, _ = clients["kv"]
    q = chunk_q()
    start = S - q.shape[0]
    index = client.sparse_index(seq, 1, q, start, MIXED, B)
    k_seq, _, csr = paged(k[1], k[1], page_size=8)
    expected = build_index(q, k_seq, csr, start, MIXED, block_size=B)
    for name in ("block_index", "block_count", "column_index", "column_count"):
        assert torch.equal(getattr(index, name), getattr(expected, name)), name
    assert (index.start, index.num_queries, index.block_size) == (start, q.shape[0], B)


def test_served_sparse_prefill_is_the_reference_on_the_served_index(clients):
    client, seq = clients["in-process"]
    k, v = clients["kv"]
    q = chunk_q()
    start = S - q.shape[0]
    result = client.sparse_prefill(seq, 0, q, start, MIXED, B)
    k_seq, v_seq, csr = paged(k[0], v[0], page_size=8)
    index = client.sparse_index(seq, 0, q, start, MIXED, B)
    out, lse = minference_prefill(q, k_seq, v_seq, csr, index)
    torch.testing.assert_close(result.out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.lse, lse, rtol=1e-5, atol=1e-5)
    assert (result.pairs, result.causal_pairs) == index_pairs(index)
    assert 0 < result.density < 1 and result.bytes_read > 0
    assert client.stats()["methods"]["minference"]["calls"] >= 1


def test_served_sparse_prefill_with_causal_patterns_is_dense_causal_attention(clients):
    client, seq = clients["in-process"]
    k, v = clients["kv"]
    q = chunk_q(S)
    result = client.sparse_prefill(seq, 1, q, 0, CAUSAL, B)
    torch.testing.assert_close(result.out, dense_causal(q, k[1], v[1], 0), rtol=1e-5, atol=1e-5)
    assert result.density == 1.0


def test_remote_answers_equal_the_in_process_ones(clients):
    (local, local_seq), (remote, remote_seq) = clients["in-process"], clients["remote"]
    q = chunk_q(37, seed=9)
    start = S - 37
    for patterns in (MIXED, VERTICAL_SLASH):
        a = local.sparse_index(local_seq, 1, q, start, patterns, B)
        b = remote.sparse_index(remote_seq, 1, q, start, patterns, B)
        for name in ("block_size", "start", "num_queries", "block_index", "block_count", "column_index",
                     "column_count"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
        a = local.sparse_prefill(local_seq, 1, q, start, patterns, B, backend="torch")
        b = remote.sparse_prefill(remote_seq, 1, q, start, patterns, B, backend="torch")
        assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)
        assert (a.bytes_read, a.pairs, a.causal_pairs) == (b.bytes_read, b.pairs, b.causal_pairs)


def test_a_tiered_store_serves_the_same_attention(tmp_path):
    gen = torch.Generator().manual_seed(11)
    k, v = torch.randn((L, S, HKV, D), generator=gen), torch.randn((L, S, HKV, D), generator=gen)
    plain = InProcessClient(store_config())
    tiered = InProcessClient(KVCacheConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=4, dtype="float32",
                                           device="cpu", device_pages=6, host_pages=40, disk_pages=0,
                                           disk_path=str(tmp_path), pinned_tail_pages=1))
    q = chunk_q()
    results = []
    for c in (plain, tiered):
        seq = c.create().seq_id
        c.append(seq, k, v)
        results.append(c.sparse_prefill(seq, 1, q, S - q.shape[0], MIXED, B))
    torch.testing.assert_close(results[1].out, results[0].out, rtol=0, atol=0)


CLIENT_ERRORS = {
    "unknown sequence": (lambda c, s: c.sparse_index("f" * 32, 0, chunk_q(), 60, A_SHAPE, B), SequenceNotFound),
    "q of the wrong head dim": (lambda c, s: c.sparse_index(s, 0, torch.zeros(4, HQ, D + 1), 0, A_SHAPE, B),
                                ShapeMismatch),
    "q heads not a multiple of the kv heads": (
        lambda c, s: c.sparse_prefill(s, 0, torch.zeros(4, HKV + 1, D), 0, A_SHAPE, B), ShapeMismatch),
    "q of another dtype": (lambda c, s: c.sparse_index(s, 0, torch.zeros(4, HQ, D, dtype=torch.float16), 0,
                                                       A_SHAPE, B), DTypeMismatch),
    "chunk beyond the cache": (lambda c, s: c.sparse_prefill(s, 0, chunk_q(), S - 10, VERTICAL_SLASH, B),
                               PositionOutOfRange),
    "negative start": (lambda c, s: c.sparse_index(s, 0, chunk_q(), -1, A_SHAPE, B), PositionOutOfRange),
    "layer out of range": (lambda c, s: c.sparse_index(s, L, chunk_q(), 0, A_SHAPE, B), InvalidParameter),
    "a pattern per head, but too few": (lambda c, s: c.sparse_index(s, 0, chunk_q(), 0, [A_SHAPE, CAUSAL], B),
                                        InvalidParameter),
    "bad pattern size": (lambda c, s: c.sparse_index(s, 0, chunk_q(), 0, HeadPattern("block_sparse", top_k=1), B),
                         InvalidParameter),
    "unknown backend": (lambda c, s: c.sparse_prefill(s, 0, chunk_q(), 0, A_SHAPE, B, backend="fast"),
                        InvalidParameter),
}


@pytest.mark.parametrize("which", ["in-process", "remote"])
@pytest.mark.parametrize("case", list(CLIENT_ERRORS))
def test_bad_sparse_calls_raise_the_same_error_in_process_and_remote(clients, which, case):
    client, seq = clients[which]
    call, error = CLIENT_ERRORS[case]
    with pytest.raises(error):
        call(client, seq)


def test_wire_errors_get_their_status_codes(server, clients):
    _, seq = clients["remote"]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVCacheStub(channel)
        q = to_wire(chunk_q())
        cases = [
            (pb.SparseIndexRequest(seq_id="f" * 32, q=q, pattern="causal"), grpc.StatusCode.NOT_FOUND),
            (pb.SparseIndexRequest(seq_id=seq, pattern="causal"), grpc.StatusCode.INVALID_ARGUMENT),  # no q
            (pb.SparseIndexRequest(seq_id=seq, q=q), grpc.StatusCode.INVALID_ARGUMENT),  # no pattern
            (pb.SparseIndexRequest(seq_id=seq, q=q, pattern="a_shape", sizes={"n_init": 4}),
             grpc.StatusCode.INVALID_ARGUMENT),  # a size missing
            (pb.SparseIndexRequest(seq_id=seq, q=q, pattern="causal", start=S), grpc.StatusCode.OUT_OF_RANGE),
        ]
        for request, code in cases:
            for rpc in (stub.SparseIndex, stub.SparsePrefill):
                with pytest.raises(grpc.RpcError) as excinfo:
                    rpc(request, timeout=10)
                assert excinfo.value.code() == code, (request, excinfo.value.details())
        reply = stub.SparseIndex(pb.SparseIndexRequest(seq_id=seq, q=q, pattern="causal", start=S - 40,
                                                       block_size=B), timeout=10)
        assert tuple(reply.tensors[1].shape) == (HQ, 4)  # block counts: positions 60..99 fall in blocks 3..6
