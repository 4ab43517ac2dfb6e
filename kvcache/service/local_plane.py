"""LocalPlane: the same-host data plane of `kvcache serve` (docs/wire-protocol.md, "Local data plane").

A decode step's layer calls are small messages (SmolLM2 at batch 1: 4 KB in, 2 KB out), so what a call costs over
gRPC is grpcio's round trip (230-340 us), not its bytes. Here they go over a Unix socket instead, the same
AttendRequest and AttendResponse messages framed by a length: a round trip of about 10 us on the 2-core machine.
A client reaches the socket only with a ticket handed out over the authenticated gRPC channel (OpenDataPlane), one
use and short-lived, and only as the user the server runs as; the connection then acts as the gRPC connection that
asked for it (its per-client caps, its sequences). Control calls (create, fork, free, plan, stats) stay on gRPC.

A server that shares its page pool (`kvcache serve --share-pool`) serves a second kind of connection, asked for in
the hello: the engine gets the pool's shared memory and leases each decode step's pages, one LeaseRequest frame per
step, then appends and attends itself (kvcache/service/pool_sessions.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable

import grpc

from kvcache.errors import KVCacheError
from kvcache.service.pool_sessions import PoolSession
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.frames import read_frame, write_frame, write_frame_with_fds

log = logging.getLogger("kvcache.service.local_plane")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid of a Unix socket's peer (Linux SO_PEERCRED)


def error_reply(code: grpc.StatusCode, message: str, error_class: str) -> pb.AttendResponse:
    """An AttendResponse that carries a status instead of a result."""
    return pb.AttendResponse(error_code=code.value[0], error_message=message, error_class=error_class)


class LocalPlane:
    """A Unix socket that serves AttendRequest frames with `serve(request, client)` for clients holding a ticket."""

    def __init__(self, serve: Callable[[pb.AttendRequest, str], tuple[pb.AttendResponse, Callable[[], None] | None]],
                 max_message_bytes: int,
                 max_connections: int = 64, ticket_seconds: float = 30.0,
                 pool: Callable[[str], PoolSession | None] | None = None) -> None:
        self._serve_request = serve  # (the answer, what is left to do once it is sent, or None)
        self._pool = pool  # a new connection's PoolSession, for a client; None where the pool is not shared
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.ticket_seconds = ticket_seconds
        self._dir = tempfile.mkdtemp(prefix="kvcache-plane-")  # 0700: no other user can reach the socket in it
        self.path = os.path.join(self._dir, "attend.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self._listener.listen(max_connections)
        self._tickets: dict[str, tuple[str, float]] = {}  # ticket -> (the gRPC peer it stands for, expiry)
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="kvcache-plane-accept").start()

    def offer(self, client: str) -> pb.DataPlaneOffer:
        """A ticket for `client` (a gRPC peer) and where to use it."""
        ticket = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old in [t for t, (_, due) in self._tickets.items() if due < now]:
                del self._tickets[old]
            self._tickets[ticket] = (client, now + self.ticket_seconds)
        return pb.DataPlaneOffer(socket_path=self.path, ticket=ticket, ticket_seconds=self.ticket_seconds)

    @property
    def connections(self) -> int:
        """Open client connections."""
        with self._lock:
            return len(self._connections)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every connection (their clients see UNAVAILABLE), wait up to `timeout` s for calls
        being served to finish, remove the socket."""
        with self._lock:
            self._closed = True
            connections, threads = list(self._connections), list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- internals -------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                admitted = not self._closed and len(self._connections) < self.max_connections
                if admitted:
                    self._connections.add(conn)
            if not admitted:
                self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED, "TooManyStreams",
                             f"{self.max_connections} data plane connections already open: use gRPC")
                continue
            thread = threading.Thread(target=self._connection, args=(conn,), daemon=True, name="kvcache-plane")
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, error_class: str, message: str) -> None:
        with contextlib.suppress(OSError):
            write_frame(conn, error_reply(code, message, error_class).SerializeToString())
        conn.close()

    def _connection(self, conn: socket.socket) -> None:
        try:
            admitted = self._admit(conn)
            if admitted is not None:
                client, pool = admitted
                log.info(json.dumps({"event": "data_plane_open", "peer": client, "pool": pool}))
                if pool:
                    self._serve_pool(conn, client)
                else:
                    self._serve(conn, client)
        except OSError:  # ConnectionError and socket timeouts included
            pass  # the client went away: its sequences live on under their leases
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _admit(self, conn: socket.socket) -> tuple[str, bool] | None:
        """The gRPC peer this connection stands for and whether it asks for the shared pool, after its hello; None
        (refused and answered) if its user or ticket is wrong."""
        uid = _peer_uid(conn)
        if uid is not None and uid != os.getuid():
            self._refuse(conn, grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied",
                         "the data plane serves only processes of the server's own user")
            return None
        conn.settimeout(self.ticket_seconds)  # a connection that never says hello does not hold its thread forever
        try:
            hello = pb.LocalHello.FromString(read_frame(conn, 4096) or b"")
        except Exception:  # a malformed or missing hello (or none in time) is refused like a wrong ticket
            hello = pb.LocalHello()
        with self._lock:
            client, due = self._tickets.pop(hello.ticket, (None, 0.0))
        if client is None or due < time.monotonic():
            self._refuse(conn, grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated",
                         "no such data plane ticket (each is good once, for a short while): ask OpenDataPlane again")
            return None
        conn.settimeout(None)
        if not hello.pool:
            write_frame(conn, pb.AttendResponse().SerializeToString())
        return client, hello.pool

    def _serve_pool(self, conn: socket.socket, client: str) -> None:
        session = self._pool(client) if self._pool is not None else None
        if session is None:
            self._refuse(conn, grpc.StatusCode.UNIMPLEMENTED, "NotSupported",
                         "the server does not share its page pool (kvcache serve --share-pool)")
            return
        try:
            try:
                offer, fds = session.offer()
            except KVCacheError as exc:  # a full store cannot spare the scratch page of a GPU engine's graphs
                self._refuse(conn, getattr(grpc.StatusCode, exc.grpc_code), type(exc).__name__, str(exc))
                return
            write_frame_with_fds(conn, offer.SerializeToString(), fds)
            self._answer(conn, pb.LeaseRequest, lambda request: (session.serve(request), None), pb.LeaseReply)
        finally:
            session.close()  # the engine went away (or the server closes): its step is aborted now

    def _serve(self, conn: socket.socket, client: str) -> None:
        self._answer(conn, pb.AttendRequest, lambda request: self._serve_request(request, client), pb.AttendResponse)

    def _answer(self, conn: socket.socket, kind: type, serve: Callable, reply_kind: type) -> None:
        """Answer each frame of `conn` with serve(request) (a `kind` message in; out, a `reply_kind` one and what is
        left to do once it is sent, or None; a frame that does not parse is answered INVALID_ARGUMENT), until the
        peer closes or sends a frame over the limit."""
        while True:
            try:
                frame = read_frame(conn, self.max_message_bytes)
            except ValueError as exc:  # the rest of the frame cannot be skipped safely: answer, then hang up
                self._refuse(conn, grpc.StatusCode.RESOURCE_EXHAUSTED, "MessageTooLarge", str(exc))
                return
            if frame is None:
                return
            finish = None
            try:
                request = kind.FromString(frame)
            except Exception:  # protobuf's DecodeError: the frame is not a `kind`
                reply = reply_kind(error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                   error_message=f"the frame is not a {kind.__name__}", error_class="ShapeMismatch")
            else:
                reply, finish = serve(request)
            try:
                write_frame(conn, reply.SerializeToString())
            finally:
                if finish is not None:
                    finish()


def _peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket, where the OS tells it (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid
