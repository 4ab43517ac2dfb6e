"""Length-prefixed frames: how the local data plane carries the proto's messages over a Unix socket
(docs/wire-protocol.md, "Local data plane")."""

from __future__ import annotations

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
