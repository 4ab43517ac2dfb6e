"""LocalConnection: a client's end of the same-host data plane (kvcache/service/local_plane.py,
docs/wire-protocol.md "Local data plane"): AttendRequest frames out, AttendResponse frames back, on a Unix socket."""

from __future__ import annotations

import contextlib
import socket

from kvcache import errors
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.frames import read_frame, write_frame


class LocalConnection:
    """One connection to a server's local data plane, bound by `ticket` to the gRPC connection that got it."""

    def __init__(self, path: str, ticket: str, timeout: float | None, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)  # FileNotFoundError on another host: the path is the server's, not ours
            write_frame(self._sock, pb.LocalHello(ticket=ticket).SerializeToString())
            reply = self._reply()
        except BaseException:
            self._sock.close()
            raise
        if reply.error_code:
            self._sock.close()
            raise ConnectionRefusedError(f"the data plane refused the connection: {reply.error_message}")
        self.closed = False

    def call(self, request: pb.AttendRequest, timeout: float | None) -> pb.AttendResponse:
        """Send one attend and wait for its answer; Unavailable if the server went away or did not answer within
        `timeout` seconds (the connection is then closed: a late answer would be taken for the next call's)."""
        try:
            self._sock.settimeout(timeout)
            write_frame(self._sock, request.SerializeToString())
            return self._reply()
        except TimeoutError:
            self.close()
            raise errors.Unavailable(f"no attend reply within {timeout} s [DEADLINE_EXCEEDED]") from None
        except (OSError, ValueError) as exc:  # ConnectionError is an OSError
            self.close()
            raise errors.Unavailable(f"the server's data plane closed ({exc}) [UNAVAILABLE]") from None

    def _reply(self) -> pb.AttendResponse:
        frame = read_frame(self._sock, self.max_message_bytes)
        if frame is None:
            raise ConnectionError("the server closed the connection")
        return pb.AttendResponse.FromString(frame)

    def close(self) -> None:
        """Hang up."""
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
