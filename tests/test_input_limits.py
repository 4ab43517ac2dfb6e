"""Inputs the server refuses before any work, beyond the store's own checks: shapes with a zero or a huge dimension,
NaN and Inf, more query heads than a call may bring, a scale that would overflow, the Triton backend on a CPU store;
and Health answering DRAINING while the server drains, which stays bounded whatever clients do."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
import torch
from service_support import running_server, store_config

from kvcache import InProcessClient, InvalidParameter, RemoteClient, ShapeMismatch
from kvcache.service.input_limits import InputLimits, surely_finite
from kvcache.service.server import Server, ServerOptions
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire import kvcache_pb2_grpc as pb_grpc
from kvcache.wire.codec import from_wire, to_wire

pytestmark = pytest.mark.service


@contextlib.contextmanager
def running(**options):
    with running_server(**options) as server, RemoteClient(f"127.0.0.1:{server.port}", timeout=10,
                                                            retries=0) as client:
        yield server, client


def _seq(client, n=9):
    sid = client.create().seq_id
    client.append(sid, torch.randn((2, n, 2, 16)), torch.randn((2, n, 2, 16)))
    return sid


def test_a_shape_with_a_zero_and_a_huge_dimension_is_refused_as_a_shape():
    with pytest.raises(ShapeMismatch, match="larger than"):
        from_wire(pb.Tensor(dtype="float32", shape=[0, 2**62, 2, 16], data=b""), "k")
    with pytest.raises(ShapeMismatch, match="dimensions"):
        from_wire(pb.Tensor(dtype="float32", shape=[1] * 9, data=b"\0\0\0\0"), "q")
    with running() as (server, client):
        stub = pb_grpc.KVCacheStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        sid = _seq(client)
        bad = pb.AppendRequest(seq_id=sid, k=pb.Tensor(dtype="float32", shape=[0, 2**62, 2, 16], data=b""),
                               v=pb.Tensor(dtype="float32", shape=[0, 2**62, 2, 16], data=b""), layer=0)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Append(bad, timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.describe(sid).lengths == (9, 9)


@pytest.mark.parametrize("where", ["append", "q", "new_k"])
def test_nan_and_inf_are_refused_and_nothing_is_written(where):
    with running() as (_, client):
        sid = _seq(client)
        other = _seq(client)
        before = client.fetch(other, 0, "rows", torch.arange(9).expand(2, 9)).tensors
        q, row = torch.randn((1, 4, 16)), torch.randn((1, 2, 16))
        with pytest.raises(InvalidParameter, match="NaN or Inf"):
            if where == "append":
                k = torch.randn((3, 2, 16))
                k[1, 0, 5] = float("nan")
                client.append(sid, k, torch.randn((3, 2, 16)), layer=0)
            elif where == "q":
                q[0, 1, 2] = float("inf")
                client.attend([sid], 0, q, new_k=row, new_v=row)
            else:
                row[0, 0, 0] = float("-inf")
                client.attend([sid], 0, q, new_k=row, new_v=row)
        assert client.describe(sid).lengths == (9, 9)
        after = client.fetch(other, 0, "rows", torch.arange(9).expand(2, 9)).tensors
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_server_may_accept_nonfinite_inputs_but_never_answers_a_nonfinite_result_as_ok():
    with running(reject_nonfinite=False) as (_, client):
        sid = _seq(client)
        k = torch.randn((1, 2, 16))
        k[0, 0, 0] = float("nan")
        client.append(sid, k, torch.randn((1, 2, 16)), layer=0)  # accepted: the server was told to
        with pytest.raises(InvalidParameter, match="not finite"):
            client.attend([sid], 0, torch.randn((1, 4, 16)))


def test_a_scale_that_would_overflow_the_scores_is_refused():
    client = InProcessClient(store_config())
    sid = _seq(client)
    with pytest.raises(InvalidParameter, match="scale"):
        client.attend([sid], 0, torch.randn((1, 4, 16)), "dense", {"scale": 1e308})
    client.attend([sid], 0, torch.randn((1, 4, 16)), "dense", {"scale": 2.0})


def test_more_query_heads_than_a_call_may_bring_are_refused_before_any_work():
    with running(max_query_heads=8) as (_, client):
        sid = _seq(client)
        client.attend([sid], 0, torch.randn((1, 8, 16)), "quest", {"top_pages": 1})
        with pytest.raises(InvalidParameter, match="query heads"):
            client.attend([sid], 0, torch.randn((1, 10, 16)), "quest", {"top_pages": 1})
    with running() as (_, client):  # the default: 16 per kv head
        sid = _seq(client)
        with pytest.raises(InvalidParameter, match="at most 32"):
            client.attend([sid], 0, torch.randn((1, 34, 16)))


def test_the_triton_backend_on_a_cpu_store_is_an_invalid_argument_outside_the_interpreter(monkeypatch):
    client = InProcessClient(store_config())
    sid = _seq(client)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InvalidParameter, match="CUDA store"):
        client.attend([sid], 0, torch.randn((1, 4, 16)), backend="triton")


def test_health_answers_draining_and_a_polling_client_cannot_hold_the_drain_open():
    server = Server(store_config(), ServerOptions(port=0, workers=4, grace_seconds=20))
    server.start()
    seen, stop = [], threading.Event()
    with RemoteClient(f"127.0.0.1:{server.port}", timeout=5, retries=0) as client:
        assert client.health() == "SERVING"

        def poll():
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    seen.append(client.health())
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.monotonic()
        server.drain_and_stop()
        took = time.monotonic() - t0
        stop.set()
        poller.join()
    assert "DRAINING" in seen
    assert took < 3, f"the drain took {took:.1f} s with a client polling Health"


def test_a_stalled_append_stream_blocks_no_call_on_its_sequence():
    with running() as (server, client):
        sid = _seq(client)
        stub = pb_grpc.KVCacheStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        resume = threading.Event()

        def chunks():
            for _ in range(2):
                yield pb.AppendRequest(seq_id=sid, k=to_wire(torch.randn((3, 2, 16))),
                                       v=to_wire(torch.randn((3, 2, 16))), layer=0)
                resume.wait(10)  # the client stalls after each chunk

        reply = stub.AppendStream.future(chunks(), timeout=20)
        deadline = time.monotonic() + 5
        while client.describe(sid).lengths[0] == 9 and time.monotonic() < deadline:
            time.sleep(0.02)  # the first chunk lands while the stream stays open
        t0 = time.monotonic()
        assert client.describe(sid).lengths == (12, 9)
        client.attend([sid], 1, torch.randn((1, 4, 16)))
        assert time.monotonic() - t0 < 2, "a call on the sequence waited for the stalled stream"
        resume.set()
        assert reply.result().lengths == [15, 9]


def test_idle_streams_up_to_the_cap_leave_threads_for_every_unary_call():
    with running() as (server, client):  # 4 workers: at most 2 open streams, append and attend together
        sid = _seq(client)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.KVCacheStub(channel)
        release = threading.Event()

        def idle():
            release.wait(20)
            return
            yield  # a request stream that sends nothing until released

        opened = [stub.AppendStream.future(idle(), timeout=30), stub.AttendStream(idle(), timeout=30)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as excinfo:  # a third stream finds no slot
            stub.AppendStream(idle(), timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        t0 = time.monotonic()
        assert client.health() == "SERVING"
        assert client.describe(sid).lengths == (9, 9)
        client.attend([sid], 0, torch.randn((1, 4, 16)))  # its own stream is refused: it goes unary
        client.append_chunks(sid, [(torch.randn((2, 2, 2, 16)), torch.randn((2, 2, 2, 16)))] * 2)
        assert client.describe(sid).lengths == (13, 13)
        assert time.monotonic() - t0 < 3
        release.set()
        for call in opened:
            with contextlib.suppress(grpc.RpcError):
                call.result() if hasattr(call, "result") else list(call)


def test_a_call_whose_client_gave_up_while_it_waited_does_nothing_afterwards():
    with running() as (server, client):
        sid = _seq(client)
        with server.servicer.locks.hold([sid]):  # another call holds the sequence
            with RemoteClient(f"127.0.0.1:{server.port}", timeout=0.5, retries=0) as impatient:
                with pytest.raises(Exception):  # noqa: B017 (the deadline's class depends on the path)
                    impatient.free(sid)
        time.sleep(0.3)
        assert client.describe(sid).lengths == (9, 9)  # the Free did not run once the lock was released


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_byte_screen_clears_finite_tensors_and_never_a_nan_or_an_inf(dtype):
    t = torch.randn(3, 9, 64).to(dtype) * 100
    assert surely_finite(to_wire(t).data, dtype)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[2, 8, 63] = bad
        assert not surely_finite(to_wire(u).data, dtype)
        with pytest.raises(InvalidParameter, match="NaN or Inf"):
            InputLimits().check_finite(u, "q", to_wire(u).data)
    huge = t.clone()
    huge[0, 0, 0] = torch.finfo(dtype).max  # finite: the screen may not tell, the exact check then does
    assert surely_finite(to_wire(huge).data, dtype) == (dtype == torch.float16)
    InputLimits().check_finite(huge, "q", to_wire(huge).data)
    assert not surely_finite(to_wire(torch.arange(4, dtype=torch.int32)).data, torch.int32)  # not a float: no say


def test_a_nonfinite_result_is_refused_whatever_bytes_come_with_it():
    out, lse = torch.randn(1, 4, 16), torch.randn(1, 4)
    InputLimits().check_result(out, lse, (to_wire(out).data, to_wire(lse).data))
    lse[0, 1] = float("nan")
    with pytest.raises(InvalidParameter, match="not finite"):
        InputLimits().check_result(out, lse, (to_wire(out).data, to_wire(lse).data))


def test_nan_in_a_streamed_attend_is_refused_over_grpc_too():
    with running_server() as server, RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0,
                                                  data_plane="grpc") as client:
        sid = _seq(client)
        q, row = torch.randn((1, 4, 16)).half(), torch.randn((1, 2, 16))
        q[0, 3, 15] = float("nan")
        with pytest.raises(InvalidParameter, match="q holds NaN"):
            client.attend([sid], 0, q.float(), new_k=row, new_v=row)
        row[0, 1, 0] = float("inf")
        with pytest.raises(InvalidParameter, match="new_v holds NaN"):
            client.attend([sid], 0, torch.randn((1, 4, 16)), new_k=torch.randn((1, 2, 16)), new_v=row)
        assert client.describe(sid).lengths == (9, 9)
