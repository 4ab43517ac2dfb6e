"""Length-prefixed frames: how the local data plane carries the proto's messages over a Unix socket
(docs/wire-protocol.md, "Local data plane")."""

from __future__ import annotations

import os
import socket
import struct

FRAME = struct.Struct("<I")  # the length of the message that follows, in bytes


def read_frame(sock: socket.socket, limit: int) -> bytes | None:
    """The next frame's message from `sock`, or None if the peer closed it between frames; ConnectionError if it
    closed mid-frame, ValueError if the frame is longer than `limit` bytes."""
    header = _read_exactly(sock, FRAME.size, at_boundary=True)
    if header is None:
        return None
    (n,) = FRAME.unpack(header)
    if n > limit:
        raise ValueError(f"a frame of {n:,} bytes is over the {limit:,}-byte message limit")
    return _read_exactly(sock, n, at_boundary=False) if n else b""


def write_frame(sock: socket.socket, message: bytes) -> None:
    """Send `message` as one frame."""
    sock.sendall(FRAME.pack(len(message)) + message)


def write_frame_with_fds(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    """Send `message` as one frame with file descriptors `fds` attached (SCM_RIGHTS, Unix sockets)."""
    data = FRAME.pack(len(message)) + message
    sent = socket.send_fds(sock, [data], fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def read_frame_with_fds(sock: socket.socket, limit: int, max_fds: int) -> tuple[bytes, list[int]]:
    """The next frame's message and the descriptors that came with it (write_frame_with_fds); ConnectionError if the
    peer closed the socket first."""
    data, fds, _, _ = socket.recv_fds(sock, FRAME.size + limit, max_fds)
    try:
        if not data:
            raise ConnectionError("the peer closed the data plane")
        if len(data) < FRAME.size:
            data += _read_exactly(sock, FRAME.size - len(data), at_boundary=False)
        (n,) = FRAME.unpack(data[: FRAME.size])
        if n > limit:
            raise ValueError(f"a frame of {n:,} bytes is over the {limit:,}-byte message limit")
        body = data[FRAME.size :]
        if len(body) < n:
            body += _read_exactly(sock, n - len(body), at_boundary=False)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return body, list(fds)


def _read_exactly(sock: socket.socket, n: int, at_boundary: bool) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if at_boundary and got == 0:
                return None
            raise ConnectionError("the peer closed the data plane mid-frame")
        got += k
    return bytes(buf)
