"""Faults that once took the server down, repeated against a `kvcache serve` process: the oversized attend (a q of
240,000 query heads, well under the message limit, which once drove a server to 18.6 GB) is refused before any work,
and however often it comes the server's memory stays within a few message limits of where it started: the heap is
trimmed once it grows past the limit (64 MiB), and what the allocator keeps for reuse does not grow with the number
of calls (measured 20 to 85 MiB over the start here, against the 18.6 GB that once killed a server)."""

from __future__ import annotations

import time

import pytest
import torch
from service_support import start_server

from kvcache import InvalidParameter, RemoteClient
from kvcache.errors import CallTooLarge

pytestmark = pytest.mark.service


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.parametrize("flags,refusal", [((), InvalidParameter),
                                           (("--max-query-heads", "1000000"), CallTooLarge)],
                         ids=["query-head-limit", "call-memory-estimate"])
def test_the_oversized_quest_attend_is_refused_and_the_server_s_memory_is_unchanged(flags, refusal):
    server = start_server(*flags)
    try:
        with RemoteClient(server.target, timeout=60, retries=0) as client:
            sid = client.create().seq_id
            client.append(sid, torch.randn((2, 400, 2, 16)), torch.randn((2, 400, 2, 16)))
            small = torch.randn((1, 4, 16))
            client.attend([sid], 0, small, "quest", {"top_pages": 4})  # every path warmed up before measuring
            before = _rss(server.process.pid)
            q = torch.randn((1, 240_000, 16))  # 15 MB on the wire
            bound = 3 * 64 * 2**20  # three of kvcache serve's default --max-message-mb, the heap trimmer's slack
            for _ in range(2):  # twice as many calls must not keep more
                for _ in range(8):
                    t0 = time.perf_counter()
                    with pytest.raises(refusal):
                        client.attend([sid], 0, q, "quest", {"top_pages": 4})
                    assert time.perf_counter() - t0 < 10
                deadline = time.monotonic() + 5
                while _rss(server.process.pid) - before > bound and time.monotonic() < deadline:
                    time.sleep(0.25)
                grown = _rss(server.process.pid) - before
                assert grown <= bound, f"the server kept {grown / 2**20:.0f} MiB more than before"
            assert client.attend([sid], 0, small, "quest", {"top_pages": 4}).out.shape == (1, 4, 16)
            assert client.health() == "SERVING"
    finally:
        server.stop()
