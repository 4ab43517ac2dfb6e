"""`kvcache serve` over the wire: status codes for bytes a RemoteClient would never send, bearer
token, TLS, metrics, TOML config, stale stubs, unguessable ids, load, and shutdown under load.

Raw stubs (kvcache.wire.kvcache_pb2*) on a grpc.insecure_channel send malformed messages. Servers are
`kvcache serve` subprocesses on free loopback ports (tests/service_support.py), except one in-process
Server whose internal state a test inspects.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch
import torch.nn.functional as F
from service_support import (
    REPO_ROOT,
    STORE,
    serving,
    start_servers,
    stop_servers,
    store_config,
)

from kvcache import errors
from kvcache.clients.remote import RemoteClient
from kvcache.service.serve_cli import add_arguments, parse_cpus, resolve
from kvcache.service.server import Server, ServerOptions
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire import kvcache_pb2_grpc as pb_grpc
from kvcache.wire.codec import from_wire, to_wire

L, HKV, D, P = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"], STORE["page_size"]
HQ = 2 * HKV
SERVING = pb.HealthResponse(status="SERVING")
LOAD_PAGES = 2048
TOKEN = secrets.token_hex(16)
GRACE = 1.0  # --grace-seconds of the servers the shutdown tests stop


# ---- the module's servers, started together -----------------------------------------------------------

# A `kvcache serve` whose SIGTERM is delivered to one of its non-main threads, as the kernel may do
# with a signal sent to the process while the main thread is not the one that takes it.
SIGTERM_TO_A_WORKER_THREAD = """
import signal, sys, threading, time
from kvcache.cli import main

def deliver_sigterm_to_this_thread():
    while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # until run_server installs its handler
        time.sleep(0.01)
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=deliver_sigterm_to_this_thread, daemon=True).start()
sys.exit(main(sys.argv[1:]))
"""


def _self_signed(directory, name="localhost"):
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True, timeout=30)
    return cert, key


# A CPU this process may run on (CI machines may not offer CPU 0), for the toml server's `cpus`.
A_CPU = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and its key (paths)."""
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory, certificate):
    """main: 1 MB messages, metrics on, room for the load test; token: --token-file; tls: a self-signed
    certificate for localhost; toml: a --config file (with a token in its [server] table) and one flag;
    and three that the shutdown tests stop (each start is mostly importing torch: together is faster)."""
    directory = tmp_path_factory.mktemp("servers")
    (directory / "token").write_text(TOKEN + "\n")
    cert, key = certificate
    config = directory / "kvcache.toml"
    config.write_text(
        "[store]\nnum_layers = 3\nnum_kv_heads = 1\nhead_dim = 8\npage_size = 8\ndtype = \"float16\"\n"
        "device_pages = 64\n\n"
        f"[server]\ntoken_file = \"{directory / 'token'}\"\nworkers = 4\ngrace_seconds = 2.0\n"
        + (f"cpus = \"{A_CPU}\"\n" if A_CPU is not None else "")
    )
    started = start_servers({
        "main": (("--max-message-mb", "1", "--metrics-port", "0", "--pages", str(LOAD_PAGES)), {}),
        "token": (("--token-file", str(directory / "token")), {}),
        "tls": (("--tls-cert", str(cert), "--tls-key", str(key)), {}),
        "toml": (("--config", str(config), "--page-size", "2"), {"store_flags": ()}),
        "to stop under load": (("--grace-seconds", str(GRACE)), {}),
        "to stop while called": (("--grace-seconds", "3"), {}),
        "to stop from a worker thread": (("--grace-seconds", str(GRACE)),
                                         {"launcher": ("-c", SIGTERM_TO_A_WORKER_THREAD)}),
    })
    yield started
    stop_servers(list(started.values()))


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    try:
        yield pb_grpc.KVCacheStub(channel)
    finally:
        channel.close()


@pytest.fixture
def seq(stub):
    """A sequence of 8 positions in every layer, made over raw stubs; freed afterwards."""
    seq_id = stub.Create(pb.CreateRequest(), timeout=10).seq_id
    k, v = _kv(torch.Generator().manual_seed(0), L, 8, HKV, D)
    stub.Append(pb.AppendRequest(seq_id=seq_id, k=to_wire(k), v=to_wire(v)), timeout=10)
    yield seq_id
    try:
        stub.Free(pb.SequenceRef(seq_id=seq_id), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND


def _kv(gen, *shape):
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _q(batch: int = 1, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn((batch, HQ, D), generator=gen)


def _rows(stub, seq_id: str) -> list:
    """Lengths and every row of every layer, read over raw stubs."""
    info = stub.Describe(pb.SequenceRef(seq_id=seq_id), timeout=10)
    seen = [tuple(info.lengths), info.num_pages]
    for layer in range(L):
        S = info.lengths[layer]
        index = torch.arange(S).expand(HKV, S).contiguous()
        reply = stub.Fetch(pb.FetchRequest(seq_id=seq_id, layer=layer, what="rows", index=to_wire(index)), timeout=10)
        seen += [from_wire(t) for t in reply.tensors]
    return seen


def _assert_same_rows(before: list, after: list) -> None:
    assert before[:2] == after[:2]
    for b, a in zip(before[2:], after[2:]):
        assert torch.equal(a, b)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA decode attention by torch SDPA: q [Hq, d] over k, v [S, Hkv, d] -> out [Hq, d], lse [Hq]."""
    group = q.shape[0] // k.shape[1]
    keys = k.transpose(0, 1).repeat_interleave(group, dim=0)
    values = v.transpose(0, 1).repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(q[:, None, :], keys, values)[:, 0]
    lse = torch.logsumexp(torch.einsum("hd,hsd->hs", q, keys) / math.sqrt(q.shape[-1]), dim=-1)
    return out, lse


# ---- bad bytes over the wire: each gets its status code, and the server keeps serving --------------------

F32_ROW = 4 * HKV * D  # bytes of one [Hkv, d] float32 row


def _append(seq_id, k, v=None, **fields):
    return pb.AppendRequest(seq_id=seq_id, k=k, v=v if v is not None else k, **fields)


def _tensor(shape, data=None, dtype="float32"):
    size = math.prod(shape) * 4
    return pb.Tensor(dtype=dtype, shape=list(shape), data=bytes(size) if data is None else data)


def _bytes_short_of_shape(stub, seq_id):
    stub.Append(_append(seq_id, _tensor([1, HKV, D], data=bytes(F32_ROW - 4)), layer=0), timeout=10)


def _bytes_beyond_shape(stub, seq_id):
    stub.Append(_append(seq_id, _tensor([1, HKV, D], data=bytes(F32_ROW + 4)), layer=0), timeout=10)


def _q_bytes_short_of_shape(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id], q=_tensor([1, HQ, D], data=bytes(10))), timeout=10)


def _unknown_dtype(stub, seq_id):
    stub.Append(_append(seq_id, _tensor([1, HKV, D], data=bytes(2 * F32_ROW), dtype="float64"), layer=0), timeout=10)


def _q_unknown_dtype(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id], q=_tensor([1, HQ, D], dtype="complex64")), timeout=10)


def _negative_dimension(stub, seq_id):
    stub.Append(_append(seq_id, pb.Tensor(dtype="float32", shape=[-1, HKV, D], data=b""), layer=0), timeout=10)


def _huge_shape(stub, seq_id):
    stub.Append(_append(seq_id, pb.Tensor(dtype="float32", shape=[2**40, 2**40, HKV, D], data=b"")), timeout=10)


def _append_without_v(stub, seq_id):
    stub.Append(pb.AppendRequest(seq_id=seq_id, k=_tensor([1, HKV, D]), layer=0), timeout=10)


def _attend_without_q(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id]), timeout=10)


def _attend_no_sequences(stub, seq_id):
    stub.Attend(pb.AttendRequest(q=_tensor([0, HQ, D])), timeout=10)


def _param_without_value(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id], q=to_wire(_q()), method="quest",
                                 params={"top_pages": pb.ParamValue()}), timeout=10)


def _param_of_wrong_kind(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id], q=to_wire(_q()), method="sparq",
                                 params={"r": pb.ParamValue(float_value=4.0), "k": pb.ParamValue(int_value=4)}),
                timeout=10)


def _negative_layer(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id], layer=-1, q=to_wire(_q())), timeout=10)


def _unknown_backend(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id], q=to_wire(_q()), backend="cuda-magic"), timeout=10)


def _float_fetch_index(stub, seq_id):
    stub.Fetch(pb.FetchRequest(seq_id=seq_id, what="rows", index=to_wire(torch.zeros(HKV, 1))), timeout=10)


def _empty_append_stream(stub, seq_id):
    stub.AppendStream(iter(()), timeout=10)


def _describe_unknown(stub, seq_id):
    stub.Describe(pb.SequenceRef(seq_id="f" * 16), timeout=10)


def _attend_unknown(stub, seq_id):
    stub.Attend(pb.AttendRequest(seq_ids=[seq_id, "f" * 16], q=to_wire(_q(2))), timeout=10)


def _fetch_unknown(stub, seq_id):
    stub.Fetch(pb.FetchRequest(seq_id="", what="value_mean"), timeout=10)


def _append_wrong_start(stub, seq_id):
    k = to_wire(torch.zeros(L, 1, HKV, D))
    stub.Append(pb.AppendRequest(seq_id=seq_id, k=k, v=k, start=3), timeout=10)


def _append_over_message_limit(stub, seq_id):
    T = (2 * 2**20) // (L * F32_ROW) + 1  # k alone is over 2 MB; the server takes 1 MB
    k = to_wire(torch.zeros(L, T, HKV, D))
    stub.Append(pb.AppendRequest(seq_id=seq_id, k=k, v=k), timeout=10)


def _sparse_index_without_sizes(stub, seq_id):
    stub.SparseIndex(pb.SparseIndexRequest(seq_id=seq_id, q=to_wire(_q()), pattern="vertical_slash"), timeout=10)


def _sparse_index_unknown(stub, seq_id):
    stub.SparseIndex(pb.SparseIndexRequest(seq_id="f" * 16, q=to_wire(_q()), pattern="causal"), timeout=10)


def _sparse_prefill_beyond_the_cache(stub, seq_id):
    stub.SparsePrefill(pb.SparseIndexRequest(seq_id=seq_id, q=to_wire(_q()), pattern="causal", start=8), timeout=10)


WIRE_CASES = {
    "tensor bytes short of its shape": (_bytes_short_of_shape, grpc.StatusCode.INVALID_ARGUMENT),
    "tensor bytes beyond its shape": (_bytes_beyond_shape, grpc.StatusCode.INVALID_ARGUMENT),
    "q bytes short of its shape": (_q_bytes_short_of_shape, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown dtype": (_unknown_dtype, grpc.StatusCode.INVALID_ARGUMENT),
    "q of unknown dtype": (_q_unknown_dtype, grpc.StatusCode.INVALID_ARGUMENT),
    "negative dimension": (_negative_dimension, grpc.StatusCode.INVALID_ARGUMENT),
    "shape of 2**80 elements": (_huge_shape, grpc.StatusCode.INVALID_ARGUMENT),
    "append without v": (_append_without_v, grpc.StatusCode.INVALID_ARGUMENT),
    "attend without q": (_attend_without_q, grpc.StatusCode.INVALID_ARGUMENT),
    "attend naming no sequence": (_attend_no_sequences, grpc.StatusCode.INVALID_ARGUMENT),
    "parameter without a value": (_param_without_value, grpc.StatusCode.INVALID_ARGUMENT),
    "float where an int parameter goes": (_param_of_wrong_kind, grpc.StatusCode.INVALID_ARGUMENT),
    "negative layer": (_negative_layer, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown backend": (_unknown_backend, grpc.StatusCode.INVALID_ARGUMENT),
    "float fetch index": (_float_fetch_index, grpc.StatusCode.INVALID_ARGUMENT),
    "append stream without chunks": (_empty_append_stream, grpc.StatusCode.INVALID_ARGUMENT),
    "describe unknown sequence": (_describe_unknown, grpc.StatusCode.NOT_FOUND),
    "attend batch with unknown sequence": (_attend_unknown, grpc.StatusCode.NOT_FOUND),
    "fetch empty sequence id": (_fetch_unknown, grpc.StatusCode.NOT_FOUND),
    "append with a wrong start": (_append_wrong_start, grpc.StatusCode.OUT_OF_RANGE),
    "message over --max-message-mb": (_append_over_message_limit, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "sparse index without the pattern's sizes": (_sparse_index_without_sizes, grpc.StatusCode.INVALID_ARGUMENT),
    "sparse index of an unknown sequence": (_sparse_index_unknown, grpc.StatusCode.NOT_FOUND),
    "sparse prefill beyond the cache": (_sparse_prefill_beyond_the_cache, grpc.StatusCode.OUT_OF_RANGE),
}


@pytest.mark.parametrize("case", list(WIRE_CASES))
def test_bad_request_gets_its_status_code_and_the_server_keeps_serving(stub, seq, case):
    call, code = WIRE_CASES[case]
    before = _rows(stub, seq)
    with pytest.raises(grpc.RpcError) as excinfo:
        call(stub, seq)
    assert excinfo.value.code() == code, excinfo.value.details()
    assert excinfo.value.details(), "the status must carry a message"
    assert stub.Health(pb.HealthRequest(), timeout=10) == SERVING
    _assert_same_rows(before, _rows(stub, seq))


def test_message_under_max_message_mb_is_accepted(stub):
    T = (2**20 - 4096) // (2 * L * F32_ROW)  # k and v together just under 1 MB
    k = to_wire(torch.ones(L, T, HKV, D))
    seq_id = stub.Create(pb.CreateRequest(), timeout=10).seq_id
    try:
        info = stub.Append(pb.AppendRequest(seq_id=seq_id, k=k, v=k), timeout=10)
        assert list(info.lengths) == [T] * L
    finally:
        stub.Free(pb.SequenceRef(seq_id=seq_id), timeout=10)


@pytest.mark.parametrize("call, error_class", [(_bytes_short_of_shape, "ShapeMismatch"),
                                                (_unknown_dtype, "DTypeMismatch"),
                                                (_describe_unknown, "SequenceNotFound"),
                                                (_append_wrong_start, "PositionOutOfRange")])
def test_rejected_call_names_its_error_class_in_trailing_metadata(stub, seq, call, error_class):
    with pytest.raises(grpc.RpcError) as excinfo:
        call(stub, seq)
    assert dict(excinfo.value.trailing_metadata())["kvcache-error"] == error_class


def test_attend_stream_answers_a_bad_request_in_band_and_goes_on(stub, seq):
    q = _q(gen=torch.Generator().manual_seed(1))
    good = pb.AttendRequest(seq_ids=[seq], layer=0, q=to_wire(q))
    bad = pb.AttendRequest(seq_ids=[seq], layer=0, q=_tensor([1, HQ, D], data=bytes(3)))
    unknown = pb.AttendRequest(seq_ids=["f" * 16], layer=0, q=to_wire(q))
    replies = list(stub.AttendStream(iter([good, bad, unknown, good]), timeout=10))
    assert [r.error_code for r in replies] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                               grpc.StatusCode.NOT_FOUND.value[0], 0]
    assert [r.error_class for r in replies] == ["", "ShapeMismatch", "SequenceNotFound", ""]
    assert replies[1].error_message and replies[2].error_message
    assert torch.equal(from_wire(replies[0].out), from_wire(replies[3].out))


def test_attend_stream_orders_replies_like_requests(stub, seq):
    gen = torch.Generator().manual_seed(2)
    qs = [_q(gen=gen) for _ in range(6)]
    replies = list(stub.AttendStream(iter([pb.AttendRequest(seq_ids=[seq], layer=1, q=to_wire(q)) for q in qs]),
                                     timeout=10))
    for q, reply in zip(qs, replies):
        alone = stub.Attend(pb.AttendRequest(seq_ids=[seq], layer=1, q=to_wire(q)), timeout=10)
        assert torch.equal(from_wire(reply.out), from_wire(alone.out))


def test_long_prefill_over_append_stream_equals_the_chunks_appended_in_order(server):
    gen = torch.Generator().manual_seed(3)
    chunks = [_kv(gen, L, T, HKV, D) for T in (5, 16, 3, 9)]
    with RemoteClient(server.target, timeout=10) as client:
        seq_id = client.create().seq_id
        try:
            info = client.append_chunks(seq_id, chunks)
            assert info.lengths == (33,) * L
            k = torch.cat([c[0] for c in chunks], dim=1)
            v = torch.cat([c[1] for c in chunks], dim=1)
            for layer in range(L):
                keys, values = client.fetch(seq_id, layer, "rows", torch.arange(33).expand(HKV, 33)).tensors
                assert torch.equal(keys.transpose(0, 1), k[layer]) and torch.equal(values.transpose(0, 1), v[layer])
        finally:
            client.free(seq_id)


def test_concurrent_appends_to_one_sequence_each_land_whole(server):
    """Calls on one sequence are ordered: chunks from 4 threads appear contiguous, in some order."""
    with RemoteClient(server.target, timeout=10) as client:
        seq_id = client.create().seq_id
        try:
            chunks = {t: torch.full((L, 3, HKV, D), float(t + 1)) for t in range(4)}

            def push(t):
                for _ in range(5):
                    client.append(seq_id, chunks[t], chunks[t])

            threads = [threading.Thread(target=push, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=20)
            assert client.describe(seq_id).lengths == (60,) * L
            keys, _ = client.fetch(seq_id, 0, "rows", torch.arange(60).expand(HKV, 60)).tensors
            marks = keys[0, :, 0].view(20, 3)  # one value per 3-position chunk
            assert torch.equal(marks, marks[:, :1].expand(20, 3)), "a chunk was split by another"
            assert sorted(marks[:, 0].tolist()) == sorted([float(t + 1) for t in range(4)] * 5)
        finally:
            client.free(seq_id)


# ---- sequence ids -----------------------------------------------------------------------------------------


def test_sequence_ids_are_random_hex_tokens(stub):
    ids = [stub.Create(pb.CreateRequest(), timeout=10).seq_id for _ in range(2)]
    try:
        assert ids[0] != ids[1]
        for seq_id in ids:
            assert re.fullmatch(r"[0-9a-f]{16,}", seq_id), seq_id
        assert int(ids[0], 16) - int(ids[1], 16) not in (-1, 1)
    finally:
        for seq_id in ids:
            stub.Free(pb.SequenceRef(seq_id=seq_id), timeout=10)


def test_a_guessed_neighbour_id_is_not_found(stub, seq):
    width = len(seq)
    for guess in (int(seq, 16) + 1, int(seq, 16) - 1):
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Describe(pb.SequenceRef(seq_id=f"{guess % 16**width:0{width}x}"), timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND


# ---- metrics --------------------------------------------------------------------------------------------


def _metrics(server) -> str:
    port = server.listening["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


def _metric(text: str, name: str, label: str) -> float:
    match = re.search(rf"^{name}\{{{label}\}} (\S+)$", text, flags=re.MULTILINE)
    assert match, f"{name}{{{label}}} missing from\n{text}"
    return float(match.group(1))


def test_listening_line_reports_the_metrics_port(server):
    assert isinstance(server.listening.get("metrics_port"), int) and server.listening["metrics_port"] > 0


def test_metrics_count_rpc_calls(server, stub):
    before = _metrics(server)
    base = _metric(before, "kvcache_rpc_calls_total", 'rpc="Health"') if 'rpc="Health"' in before else 0
    for _ in range(3):
        stub.Health(pb.HealthRequest(), timeout=10)
    text = _metrics(server)
    assert "# TYPE kvcache_rpc_calls_total counter" in text
    assert _metric(text, "kvcache_rpc_calls_total", 'rpc="Health"') == base + 3
    assert _metric(text, "kvcache_pool_pages", 'kind="pages_total"') == LOAD_PAGES


def test_metrics_count_rpc_errors(server, stub):
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            _describe_unknown(stub, "")
    text = _metrics(server)
    assert _metric(text, "kvcache_rpc_errors_total", 'rpc="Describe"') >= 2


def test_metrics_endpoint_serves_only_metrics(server):
    port = server.listening["metrics_port"]
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/secrets", timeout=10)
    assert excinfo.value.code == 404


# ---- generated stubs --------------------------------------------------------------------------------------


def test_generated_stubs_are_not_stale(tmp_path):
    """Fails when proto/kvcache.proto changed without `make proto`."""
    spec = importlib.util.spec_from_file_location("proto_generate", REPO_ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    for name in ("kvcache_pb2.py", "kvcache_pb2_grpc.py"):
        committed = (REPO_ROOT / "kvcache" / "wire" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, f"kvcache/wire/{name} is stale: run `make proto`"


# ---- bearer token ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(servers):
    return servers["token"]


@pytest.fixture(scope="module")
def token_stub(token_server):
    channel = grpc.insecure_channel(token_server.target)
    try:
        yield pb_grpc.KVCacheStub(channel)
    finally:
        channel.close()


def _health(stub, metadata):
    return stub.Health(pb.HealthRequest(), timeout=10, metadata=metadata)


def _create(stub, metadata):
    return stub.Create(pb.CreateRequest(), timeout=10, metadata=metadata)


def _append_stream(stub, metadata):
    k = to_wire(torch.zeros(L, 1, HKV, D))
    return stub.AppendStream(iter([pb.AppendRequest(seq_id="f" * 16, k=k, v=k)]), timeout=10, metadata=metadata)


def _attend_stream(stub, metadata):
    request = pb.AttendRequest(seq_ids=["f" * 16], q=to_wire(_q()))
    return list(stub.AttendStream(iter([request]), timeout=10, metadata=metadata))


CREDENTIALS = {"no token": (), "wrong token": (("authorization", "Bearer " + "0" * 32),),
               "token without Bearer": (("authorization", TOKEN),)}
RPCS = {"Health (unary)": _health, "Create (unary)": _create, "AppendStream (client stream)": _append_stream,
        "AttendStream (bidirectional)": _attend_stream}


@pytest.mark.parametrize("rpc", list(RPCS))
@pytest.mark.parametrize("credentials", list(CREDENTIALS))
def test_call_without_the_right_token_is_unauthenticated(token_stub, rpc, credentials):
    with pytest.raises(grpc.RpcError) as excinfo:
        RPCS[rpc](token_stub, CREDENTIALS[credentials])
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_refused_calls_change_nothing(token_server, token_stub):
    with RemoteClient(token_server.target, token=TOKEN, timeout=10) as client:
        before = client.stats()["pool"]
        with pytest.raises(grpc.RpcError):
            _create(token_stub, ())
        assert client.stats()["pool"] == before


def test_remote_client_with_a_wrong_token_raises_unauthenticated(token_server):
    with RemoteClient(token_server.target, token="wrong", timeout=10) as client:
        with pytest.raises(errors.Unauthenticated):
            client.create()
        with pytest.raises(errors.Unauthenticated):
            client.attend(["f" * 16], 0, _q())


def test_remote_client_with_the_token_works(token_server):
    gen = torch.Generator().manual_seed(4)
    with RemoteClient(token_server.target, token=TOKEN, timeout=10) as client:
        assert client.health() == "SERVING"
        seq_id = client.create().seq_id
        try:
            k, v = _kv(gen, L, 6, HKV, D)
            client.append(seq_id, k, v)
            q = _q(gen=gen)
            out, lse = _dense(q[0], k[1], v[1])
            result = client.attend([seq_id], 1, q)  # over the AttendStream
            torch.testing.assert_close(result.out[0], out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result.lse[0], lse, rtol=1e-5, atol=1e-5)
        finally:
            client.free(seq_id)


# ---- TLS --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(servers, certificate):
    """The TLS server and the certificate a client must trust."""
    return servers["tls"], certificate[0].read_bytes()


def test_tls_client_round_trip(tls):
    server, cert = tls
    assert server.listening["tls"] is True
    gen = torch.Generator().manual_seed(5)
    with RemoteClient(server.target, root_certificates=cert, tls_server_name="localhost", timeout=10) as client:
        seq_id = client.create().seq_id
        try:
            k, v = _kv(gen, L, 5, HKV, D)
            client.append(seq_id, k, v)
            keys, values = client.fetch(seq_id, 0, "rows", torch.arange(5).expand(HKV, 5)).tensors
            assert torch.equal(keys.transpose(0, 1), k[0]) and torch.equal(values.transpose(0, 1), v[0])
            q = _q(gen=gen)
            torch.testing.assert_close(client.attend([seq_id], 0, q).out[0], _dense(q[0], k[0], v[0])[0],
                                       rtol=1e-5, atol=1e-5)
        finally:
            client.free(seq_id)


def test_insecure_client_cannot_talk_to_a_tls_server(tls):
    server, _ = tls
    with RemoteClient(server.target, timeout=5, retries=0) as client:
        with pytest.raises(errors.Unavailable):
            client.create()


def test_client_that_does_not_trust_the_certificate_cannot_connect(tls, tmp_path):
    server, _ = tls
    other_cert, _ = _self_signed(tmp_path)
    with RemoteClient(server.target, root_certificates=other_cert.read_bytes(), tls_server_name="localhost",
                      timeout=5, retries=0) as client:
        with pytest.raises(errors.Unavailable):
            client.create()


# ---- TOML config ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toml_server(servers):
    return servers["toml"]


def test_toml_store_table_sets_the_store(toml_server):
    with RemoteClient(toml_server.target, token=TOKEN, timeout=10) as client:
        c = client.config
        assert (c.num_layers, c.num_kv_heads, c.head_dim, c.dtype, c.device_pages) == (3, 1, 8, torch.float16, 64)


def test_flags_win_over_the_toml_file(toml_server):
    with RemoteClient(toml_server.target, token=TOKEN, timeout=10) as client:
        assert client.config.page_size == 2


def test_toml_server_table_sets_the_server(toml_server):
    assert toml_server.listening["auth"] is True
    with RemoteClient(toml_server.target, timeout=10) as client:
        with pytest.raises(errors.Unauthenticated):
            client.health()


def _allowed_cpus(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of a process (Linux)."""
    lists = set()
    for status in pathlib.Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split(":", 1)[1].strip())
    return lists


@pytest.mark.skipif(A_CPU is None, reason="CPU affinity is Linux's")
def test_toml_cpus_pin_every_server_thread(toml_server):
    # cpus = "<A_CPU>" in the [server] table: the server and every thread it started (grpc's, the RPC pool's) run there.
    with RemoteClient(toml_server.target, token=TOKEN, timeout=10) as client:
        client.health()  # an RPC thread exists now
    assert _allowed_cpus(toml_server.process.pid) == {str(A_CPU)}


@pytest.mark.parametrize(("text", "cpus"), [("0", [0]), ("3,1", [1, 3]), ("0-2,5", [0, 1, 2, 5]), ("2-3,3", [2, 3])])
def test_cpus_flag_takes_cpuset_lists(text, cpus):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert resolve(parser.parse_args(["--cpus", text]))[1].cpus == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "1,,2", "0-"])
def test_malformed_cpus_are_rejected(text):
    with pytest.raises(errors.InvalidParameter, match="--cpus"):
        parse_cpus(text)


def test_serve_refuses_cpus_it_cannot_have():
    # No machine has CPU 100000: the server says so and exits 2 instead of serving unpinned.
    proc = subprocess.run([sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", "--cpus", "100000"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "--cpus" in proc.stderr


def test_unknown_toml_table_is_rejected_by_name(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[stor]\nnum_layers = 3\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(errors.InvalidParameter, match="stor"):
        resolve(parser.parse_args(["--config", str(config)]))


# ---- load ---------------------------------------------------------------------------------------------------

CLIENTS = 16
CHUNKS = (16, 5, 16, 11, 32, 8, 16, 24, 16, 40, 16, 12, 16, 8, 15, 1)  # 256 positions
ATTENDS_PER_CHUNK = 3
LOAD_SECONDS = 20.0


def _load_worker(target: str, index: int, start: threading.Barrier, deadline: float, results: dict) -> None:
    """One client: create, append in chunks (all-layer and one-layer forms), attend after each chunk."""
    gen = torch.Generator().manual_seed(100 + index)
    written_k = [[] for _ in range(L)]
    written_v = [[] for _ in range(L)]
    attends = 0
    with RemoteClient(target, timeout=LOAD_SECONDS, use_stream=index % 2 == 0) as client:
        start.wait(timeout=30)
        seq_id = client.create().seq_id
        results[index] = {"seq_id": seq_id}
        for i, T in enumerate(CHUNKS):
            k, v = _kv(gen, L, T, HKV, D)
            if i % 2 == 0:
                client.append(seq_id, k, v)
            else:
                for layer in range(L):
                    client.append(seq_id, k[layer], v[layer], layer=layer)
            for layer in range(L):
                written_k[layer].append(k[layer])
                written_v[layer].append(v[layer])
            for a in range(ATTENDS_PER_CHUNK):
                layer = a % L
                q = _q(gen=gen)
                result = client.attend([seq_id], layer, q)
                out, lse = _dense(q[0], torch.cat(written_k[layer]), torch.cat(written_v[layer]))
                torch.testing.assert_close(result.out[0], out, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(result.lse[0], lse, rtol=1e-4, atol=1e-5)
                attends += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"client {index} passed the {LOAD_SECONDS} s budget at chunk {i}")
    results[index].update(k=[torch.cat(x) for x in written_k], v=[torch.cat(x) for x in written_v], attends=attends)


def test_sixteen_concurrent_clients_keep_their_own_kv(server):
    with RemoteClient(server.target, timeout=10) as observer:
        pool_start = observer.stats()["pool"]
        results: dict[int, dict] = {}
        failures: list[str] = []
        start = threading.Barrier(CLIENTS)
        deadline = time.monotonic() + LOAD_SECONDS

        def run(index):
            try:
                _load_worker(server.target, index, start, deadline, results)
            except BaseException as exc:  # reported below, with the client that saw it
                failures.append(f"client {index}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=max(0.1, deadline - time.monotonic() + 5))
        try:
            assert not any(th.is_alive() for th in threads), "clients still running past the time budget"
            assert not failures, "\n".join(failures)
            assert sum(r["attends"] for r in results.values()) == CLIENTS * len(CHUNKS) * ATTENDS_PER_CHUNK
            for index, r in sorted(results.items()):
                info = observer.describe(r["seq_id"])
                assert info.lengths == (sum(CHUNKS),) * L
                for layer in range(L):
                    S = sum(CHUNKS)
                    keys, values = observer.fetch(r["seq_id"], layer, "rows", torch.arange(S).expand(HKV, S)).tensors
                    assert torch.equal(keys.transpose(0, 1), r["k"][layer]), f"client {index} layer {layer}: K"
                    assert torch.equal(values.transpose(0, 1), r["v"][layer]), f"client {index} layer {layer}: V"
        finally:
            for r in results.values():
                try:
                    observer.free(r["seq_id"])
                except errors.SequenceNotFound:
                    pass
        assert observer.stats()["pool"] == pool_start


def test_sixteen_streaming_clients_do_not_starve_unary_calls(server):
    """RemoteClient's default is one AttendStream per client. With 16 clients' streams open (as many as
    the server's default --workers), each client's next append must still be served."""
    clients = [RemoteClient(server.target, timeout=2) for _ in range(CLIENTS)]
    seq_ids: list[str] = []
    outcomes: dict[int, str] = {}
    all_streams_open = threading.Barrier(CLIENTS)

    def run(i: int) -> None:
        gen = torch.Generator().manual_seed(300 + i)
        try:
            clients[i].attend([seq_ids[i]], 0, _q(gen=gen))  # opens this client's stream
            all_streams_open.wait(timeout=10)
            clients[i].append(seq_ids[i], *_kv(gen, L, 1, HKV, D))
            clients[i].attend([seq_ids[i]], 1, _q(gen=gen))
            outcomes[i] = "ok"
        except Exception as exc:
            outcomes[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        for i, client in enumerate(clients):
            seq_ids.append(client.create().seq_id)
            client.append(seq_ids[i], *_kv(torch.Generator().manual_seed(i), L, 4, HKV, D))
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=6)
        hung = [i for i, th in enumerate(threads) if th.is_alive()]
    finally:
        for client in clients:
            client.close()  # cancels the streams, which frees the server's threads
        for th in threads:
            th.join(timeout=5)
        with RemoteClient(server.target, timeout=10) as observer:
            for seq_id in seq_ids:
                try:
                    observer.free(seq_id)
                except errors.SequenceNotFound:
                    pass
    assert not hung, f"clients {hung} still waiting 6 s later"
    failed = {i: o for i, o in sorted(outcomes.items()) if o != "ok"}
    assert not failed, f"{len(failed)} of {CLIENTS} clients failed, e.g. {next(iter(failed.items()))}"


DEADLINE = 0.5


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Block until the process is in the stopped state ('T' in /proc/PID/stat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {timeout} s of SIGSTOP")


@pytest.mark.parametrize("call", ["describe", "append", "unary attend", "attend on the stream"])
def test_call_to_a_frozen_server_fails_unavailable_at_its_deadline(server, call):
    """RemoteClient puts a deadline on every call: a server that stops answering (SIGSTOP) costs a
    caller its timeout, then Unavailable."""
    gen = torch.Generator().manual_seed(7)
    with RemoteClient(server.target, timeout=10) as setup, \
            RemoteClient(server.target, timeout=DEADLINE, retries=0, use_stream=call != "unary attend") as client:
        seq_id = setup.create().seq_id
        setup.append(seq_id, *_kv(gen, L, 4, HKV, D))
        q = _q(gen=gen)
        client.attend([seq_id], 0, q)  # the stream (if any) is open before the server freezes
        calls = {"describe": lambda: client.describe(seq_id),
                 "append": lambda: client.append(seq_id, *_kv(gen, L, 1, HKV, D)),
                 "unary attend": lambda: client.attend([seq_id], 0, q),
                 "attend on the stream": lambda: client.attend([seq_id], 0, q)}
        outcome: dict = {}

        def run() -> None:
            t0 = time.monotonic()
            try:
                calls[call]()
                outcome["error"] = None
            except Exception as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - t0

        thread = threading.Thread(target=run, daemon=True)
        server.process.send_signal(signal.SIGSTOP)
        try:
            _wait_stopped(server.process.pid)  # the signal is asynchronous: a call could still slip through
            thread.start()
            thread.join(timeout=DEADLINE + 2)
            hung = thread.is_alive()
        finally:
            server.process.send_signal(signal.SIGCONT)
            thread.join(timeout=10)
        setup.free(seq_id)
    assert not hung, f"{call} was still waiting {DEADLINE + 2} s after it started; its deadline is {DEADLINE} s"
    assert isinstance(outcome["error"], errors.Unavailable), outcome
    assert outcome["seconds"] < DEADLINE + 1


def test_attend_stream_recovers_after_a_missed_deadline(server):
    """A stream whose reply missed its deadline is dropped: once the server answers again, the next
    attend opens a new stream and gets the same result as before the freeze."""
    gen = torch.Generator().manual_seed(8)
    with RemoteClient(server.target, timeout=10, use_stream=False) as setup, \
            RemoteClient(server.target, timeout=10, retries=0) as client:
        seq_id = setup.create().seq_id
        setup.append(seq_id, *_kv(gen, L, 4, HKV, D))
        q = _q(gen=gen)
        expected = setup.attend([seq_id], 1, q)
        client.attend([seq_id], 1, q)  # the stream is open before the server freezes
        client.timeout = DEADLINE  # short only while the server is frozen: a loaded machine may be slow
        server.process.send_signal(signal.SIGSTOP)
        try:
            _wait_stopped(server.process.pid)
            t0 = time.monotonic()
            with pytest.raises(errors.Unavailable, match="DEADLINE_EXCEEDED"):
                client.attend([seq_id], 1, q)
            assert time.monotonic() - t0 < DEADLINE + 1
        finally:
            server.process.send_signal(signal.SIGCONT)
        client.timeout = 10
        again = client.attend([seq_id], 1, q)
        setup.free(seq_id)
    assert torch.equal(again.out, expected.out) and torch.equal(again.lse, expected.lse)


def test_calls_naming_unknown_sequences_leave_no_state_behind():
    """The server's memory returns to its start: no per-sequence state survives a call that named
    a sequence the store does not hold (an in-process Server, to look at its locks)."""
    server = Server(store_config(), ServerOptions(port=0, workers=2, grace_seconds=0))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.KVCacheStub(channel)
        seq_id = stub.Create(pb.CreateRequest(), timeout=10).seq_id
        stub.Describe(pb.SequenceRef(seq_id=seq_id), timeout=10)
        stub.Free(pb.SequenceRef(seq_id=seq_id), timeout=10)
        assert len(server.servicer.locks) == 0
        for i in range(20):
            with pytest.raises(grpc.RpcError):
                stub.Describe(pb.SequenceRef(seq_id=f"{i:016x}"), timeout=10)
        assert len(server.servicer.locks) == 0, f"{len(server.servicer.locks)} locks of unknown sequences kept"
    finally:
        channel.close()
        server.grpc.stop(0).wait()


# ---- shutdown during load ---------------------------------------------------------------------------------

SHUTDOWN_CLIENTS = 8  # 2 attend over streams, 6 over unary calls; appends are unary for all


class _ShutdownClient:
    """A client appending and attending in a loop; remembers what came back."""

    def __init__(self, target: str, index: int) -> None:
        self.index = index
        self.client = RemoteClient(target, timeout=10, retries=1, use_stream=index % 4 == 0)
        self.gen = torch.Generator().manual_seed(200 + index)
        self.seq_id = self.client.create().seq_id
        k, v = _kv(self.gen, L, 12, HKV, D)
        self.client.append(self.seq_id, k, v)
        self.k, self.v = k, v  # [L, S, Hkv, d]: what the server surely holds
        self.maybe: tuple | None = None  # an append that failed as Unavailable may or may not have landed
        self.ok = self.unavailable = 0
        self.problems: list[str] = []

    def step(self, i: int) -> None:
        try:
            if i % 4 == 3 and self.maybe is None:
                k, v = _kv(self.gen, L, 1, HKV, D)
                try:
                    info = self.client.append(self.seq_id, k, v)
                except errors.Unavailable:
                    self.maybe = (torch.cat((self.k, k), dim=1), torch.cat((self.v, v), dim=1))
                    raise
                self.k, self.v = torch.cat((self.k, k), dim=1), torch.cat((self.v, v), dim=1)
                if info.lengths != (self.k.shape[1],) * L:
                    self.problems.append(f"append answered lengths {info.lengths}, expected {self.k.shape[1]}")
            else:
                layer = i % L
                q = _q(gen=self.gen)
                result = self.client.attend([self.seq_id], layer, q)
                candidates = [(self.k, self.v)] + ([self.maybe] if self.maybe else [])
                if not any(self._matches(result, q, k[layer], v[layer]) for k, v in candidates):
                    self.problems.append(f"attend {i} at layer {layer}: wrong numbers")
            self.ok += 1
        except errors.Unavailable:
            self.unavailable += 1
        except Exception as exc:
            self.problems.append(f"call {i}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _matches(result, q, k, v) -> bool:
        out, lse = _dense(q[0], k, v)
        return bool(torch.allclose(result.out[0], out, rtol=1e-4, atol=1e-5)
                    and torch.allclose(result.lse[0], lse, rtol=1e-4, atol=1e-5))


def test_sigterm_under_load_completes_or_refuses_calls_and_exits_0(servers):
    server = servers["to stop under load"]
    clients: list[_ShutdownClient] = []
    stop = threading.Event()

    def loop(c: _ShutdownClient) -> None:
        i = 0
        while not stop.is_set():
            c.step(i)
            i += 1
            if server.process.poll() is not None:
                time.sleep(0.02)  # the server is gone: keep asking, gently

    threads: list[threading.Thread] = []
    try:
        for i in range(SHUTDOWN_CLIENTS):
            clients.append(_ShutdownClient(server.target, i))
            threads.append(threading.Thread(target=loop, args=(clients[-1],), daemon=True))
        for th in threads:
            th.start()
        warmup = time.monotonic() + 10
        while min(c.ok for c in clients) < 8 and time.monotonic() < warmup:
            time.sleep(0.02)
        assert min(c.ok for c in clients) >= 8, "clients made no progress before the shutdown"
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = _exit_code(server, GRACE + 10)
        took = time.monotonic() - sent
        time.sleep(0.3)  # calls against the stopped server must fail as Unavailable too
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=15)
        for c in clients:
            c.client.close()
    problems = [f"client {c.index}: {p}" for c in clients for p in c.problems]
    assert not problems, "\n".join(problems[:20])
    assert all(c.unavailable > 0 for c in clients), [c.unavailable for c in clients]
    assert code == 0, server.output()[-3000:]
    assert took <= GRACE + 2.0, f"exited {took:.1f} s after SIGTERM; grace is {GRACE} s"
    events = [e.get("event") for e in server.events()]
    assert "draining" in events and events[-1] == "stopped"


def _draining(server) -> bool:
    return any(e.get("event") == "draining" for e in server.events())


def _exit_code(server, timeout: float) -> int:
    try:
        return server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    pytest.fail(f"kvcache serve still running {timeout} s after SIGTERM "
                f"({'draining' if _draining(server) else 'the signal was not acted on: it never started draining'})")


def test_calls_reaching_a_draining_server_are_refused_as_unavailable(servers):
    """In-flight calls finish, new ones get UNAVAILABLE: never another status (e.g. CANCELLED)."""
    server = servers["to stop while called"]
    channel = grpc.insecure_channel(server.target)
    try:
        stub = pb_grpc.KVCacheStub(channel)
        with RemoteClient(server.target, timeout=5) as client:
            seq_id = client.create().seq_id
            client.append(seq_id, *_kv(torch.Generator().manual_seed(6), L, 4, HKV, D))
            q = _q()
            client.attend([seq_id], 0, q)  # this client's stream is open when SIGTERM comes
            burst = [stub.Describe.future(pb.SequenceRef(seq_id=seq_id), timeout=10) for _ in range(200)]
            server.process.send_signal(signal.SIGTERM)
            burst += [stub.Describe.future(pb.SequenceRef(seq_id=seq_id), timeout=10) for _ in range(100)]
            deadline = time.monotonic() + 5
            while not _draining(server) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _draining(server), "the signal was not acted on: the server never started draining"
            with pytest.raises(errors.Unavailable):
                client.attend([seq_id], 0, q)  # on the open stream: refused in band
            with pytest.raises(errors.Unavailable):
                client.describe(seq_id)
            codes: dict[str, int] = {}
            for call in burst:
                code = call.code().name
                codes[code] = codes.get(code, 0) + 1
        assert set(codes) <= {"OK", "UNAVAILABLE"}, f"status codes of calls around SIGTERM: {codes}"
        assert _exit_code(server, 3 + 5) == 0
    finally:
        channel.close()


def test_sigterm_taken_by_another_thread_still_drains_and_exits_0(servers):
    server = servers["to stop from a worker thread"]  # its SIGTERM came 0.5 s after it started listening
    assert _exit_code(server, 3) == 0
    assert [e.get("event") for e in server.events()][-2:] == ["draining", "stopped"]


def test_serve_puts_every_thread_on_one_malloc_arena():
    """`kvcache serve` asks glibc for one malloc arena (per-thread arenas made long-context attention
    on some RPC threads pay page faults for its temporaries); run where it cannot touch this process."""
    code = "from kvcache.service.serve_cli import one_malloc_arena; print(one_malloc_arena())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inputs_on", ["cpu", "cuda"])
def test_a_cuda_server_attends_as_the_in_process_cuda_store_does(inputs_on):
    # A GPU store behind the wire: q, k, v come in as bytes (from CPU or GPU tensors) and out, lse leave
    # from device memory; the answers must be the in-process GPU store's, bit for bit.
    from kvcache.clients.inprocess import InProcessClient

    flags = ("--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--page-size", "16", "--pages", "64",
             "--dtype", "float16", "--device", "cuda")
    config = store_config(num_layers=2, num_kv_heads=2, head_dim=64, page_size=16, device_pages=64,
                          dtype="float16", device="cuda")
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 37, 2, 64, generator=gen).half() for _ in range(2))
    with serving(*flags, store_flags=()) as server, RemoteClient(server.target) as remote:
        local = InProcessClient(config)
        seqs = []
        for client in (remote, local):
            seq = client.create().seq_id
            client.append(seq, k, v)
            seqs.append(seq)
        for step in range(3):
            q = torch.randn(1, 8, 64, generator=gen).half().to(inputs_on)
            nk, nv = (torch.randn(1, 2, 64, generator=gen).half().to(inputs_on) for _ in range(2))
            for layer in range(2):
                got = remote.attend([seqs[0]], layer, q, "dense", new_k=nk, new_v=nv)
                want = local.attend([seqs[1]], layer, q, "dense", new_k=nk, new_v=nv)
                assert got.out.is_cpu and torch.equal(got.out, want.out.cpu()), (step, layer)
                assert torch.equal(got.lse, want.lse.cpu()), (step, layer)
        assert remote.describe(seqs[0]).length == 37 + 3
