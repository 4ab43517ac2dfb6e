"""The local data plane (service/local_plane.py, clients/local_plane.py): layer calls over a Unix socket that only a
client holding a ticket from the authenticated channel can use, that fail fast when the server goes away, and that
fall back to gRPC under data_plane="auto" where the socket cannot be had. The whole client protocol runs over it in
test_client_protocol.py."""

from __future__ import annotations

import os
import socket
import stat
import time

import pytest
import torch
from service_support import STORE, running_server, serving

from kvcache import errors
from kvcache.clients.remote import RemoteClient
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.codec import to_wire
from kvcache.wire.frames import read_frame, write_frame

L, HKV, D = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"]


def _target(server) -> str:
    return f"127.0.0.1:{server.port}"


def _sequence(client: RemoteClient, n: int = 9) -> tuple[str, torch.Tensor]:
    seq_id = client.create().seq_id
    kv = torch.randn((2, L, n, HKV, D), generator=torch.Generator().manual_seed(n))
    client.append(seq_id, kv[0], kv[1])
    return seq_id, torch.randn((1, 2 * HKV, D), generator=torch.Generator().manual_seed(1))


def _connect(path: str, ticket: str) -> tuple[socket.socket, pb.AttendResponse]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    write_frame(sock, pb.LocalHello(ticket=ticket).SerializeToString())
    return sock, pb.AttendResponse.FromString(read_frame(sock, 1 << 20))


def test_layer_calls_over_the_plane_answer_as_grpc_and_are_counted_apart():
    with running_server() as server:
        with RemoteClient(_target(server), data_plane="grpc") as grpc_client, \
                RemoteClient(_target(server), data_plane="shared") as shared:
            seq_id, q = _sequence(grpc_client)
            want = grpc_client.attend([seq_id], 1, q, "sparq", {"r": 4, "k": 4, "local_window": 2})
            got = shared.attend([seq_id], 1, q, "sparq", {"r": 4, "k": 4, "local_window": 2})
            torch.testing.assert_close(got.out, want.out)
            assert got.bytes_read == want.bytes_read
            rpcs = shared.stats()["rpcs"]
            assert rpcs["AttendLocal"]["calls"] == 1 and rpcs["OpenDataPlane"]["calls"] == 1
            assert server.servicer.local_plane.connections == 1


def test_the_socket_is_private_and_a_ticket_works_once_and_only_for_its_holder():
    with running_server() as server, RemoteClient(_target(server)) as client:
        offer = client._call("OpenDataPlane", pb.DataPlaneRequest())
        assert stat.S_IMODE(os.stat(offer.socket_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(offer.socket_path)).st_mode) == 0o700
        wrong, reply = _connect(offer.socket_path, "not-" + offer.ticket)
        assert reply.error_class == "Unauthenticated" and "ticket" in reply.error_message
        assert read_frame(wrong, 1 << 20) is None  # and it hung up
        good, reply = _connect(offer.socket_path, offer.ticket)
        assert reply.error_code == 0
        again, reply = _connect(offer.socket_path, offer.ticket)
        assert reply.error_class == "Unauthenticated"
        for sock in (wrong, good, again):
            sock.close()


def test_a_bad_frame_is_answered_and_an_oversized_one_ends_only_its_own_connection():
    with running_server(max_message_mb=1) as server, RemoteClient(_target(server)) as client:
        seq_id, q = _sequence(client)
        offers = [client._call("OpenDataPlane", pb.DataPlaneRequest()) for _ in range(2)]
        (one, _), (two, _) = (_connect(o.socket_path, o.ticket) for o in offers)
        write_frame(one, b"\xff\xff\xff")
        reply = pb.AttendResponse.FromString(read_frame(one, 1 << 20))
        assert reply.error_class == "ShapeMismatch"
        request = pb.AttendRequest(seq_ids=[seq_id], layer=0, q=to_wire(q), method="dense")
        write_frame(one, request.SerializeToString())  # the connection goes on after a bad frame
        assert pb.AttendResponse.FromString(read_frame(one, 1 << 20)).error_code == 0
        one.sendall((3 << 20).to_bytes(4, "little"))  # a frame over the 1 MiB limit: its rest is never read
        reply = pb.AttendResponse.FromString(read_frame(one, 1 << 20))
        assert reply.error_class == "MessageTooLarge"
        assert read_frame(one, 1 << 20) is None
        write_frame(two, request.SerializeToString())
        assert pb.AttendResponse.FromString(read_frame(two, 1 << 20)).error_code == 0
        one.close()
        two.close()


def test_errors_of_a_call_come_back_as_the_in_process_client_raises_them():
    with running_server() as server, RemoteClient(_target(server), data_plane="shared") as client:
        seq_id, q = _sequence(client)
        with pytest.raises(errors.SequenceNotFound):
            client.attend(["no-such-sequence"], 0, q)
        with pytest.raises(errors.ShapeMismatch):
            client.attend([seq_id], 0, q[:, :, :3])
        assert client.attend([seq_id], 0, q).out.shape == q.shape  # and the connection still serves


def test_auto_falls_back_to_grpc_where_the_server_offers_no_plane_and_shared_says_why():
    with running_server(local_plane=False) as server:
        with RemoteClient(_target(server), data_plane="auto") as auto:
            seq_id, q = _sequence(auto)
            assert auto.attend([seq_id], 0, q).out.shape == q.shape
            assert "AttendLocal" not in auto.stats()["rpcs"]
        with RemoteClient(_target(server), data_plane="shared") as shared:
            with pytest.raises(errors.Unavailable, match="no local data plane"):
                shared.attend([seq_id], 0, q)
    with pytest.raises(errors.InvalidParameter, match="data_plane"):
        RemoteClient("127.0.0.1:1", data_plane="ipc")


def test_a_bearer_token_guards_the_ticket():
    with running_server(token="s3cret") as server:
        with RemoteClient(_target(server), data_plane="shared") as anonymous, pytest.raises(errors.Unauthenticated):
            anonymous.attend(["x"], 0, torch.zeros((1, 2 * HKV, D)))
        with RemoteClient(_target(server), token="s3cret", data_plane="shared") as client:
            seq_id, q = _sequence(client)
            assert client.attend([seq_id], 0, q).out.shape == q.shape


def test_a_server_that_dies_is_unavailable_at_once_not_a_hang():
    with serving() as server, RemoteClient(server.target, timeout=30, data_plane="shared") as client:
        seq_id, q = _sequence(client)
        client.attend([seq_id], 0, q)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            client.attend([seq_id], 0, q)
        assert time.monotonic() - t0 < 5  # the socket's end is seen, not the 30 s deadline
