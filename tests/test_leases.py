"""Leases: a sequence created with one is freed once no call has named it for that long, so what a dead client
held comes back; any call on it renews the lease; sequences without one are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from service_support import REPO_ROOT, store_config

from kvcache import InProcessClient, InvalidParameter, RemoteClient, SequenceNotFound
from kvcache.service.server import Server, ServerOptions

pytestmark = pytest.mark.service


def test_in_process_an_unused_leased_sequence_is_freed_and_counted_and_a_used_one_is_not():
    client = InProcessClient(store_config())
    idle = client.create(lease_seconds=0.2).seq_id
    used = client.create(lease_seconds=0.2).seq_id
    kept = client.create().seq_id
    for sid in (idle, used, kept):
        client.append(sid, torch.randn((2, 5, 2, 16)), torch.randn((2, 5, 2, 16)))
    free_before = client.stats()["pool"]["pages_free"]
    for _ in range(5):
        time.sleep(0.1)
        client.describe(used)  # renews
    assert client.expire_leases() == [idle]
    with pytest.raises(SequenceNotFound):
        client.describe(idle)
    pool = client.stats()["pool"]
    assert pool["sequences_expired"] == 1 and pool["pages_free"] == free_before + 2
    assert client.describe(used).lengths == (5, 5) and client.describe(kept).lengths == (5, 5)


def test_a_leased_sequence_and_its_fork_expire_even_if_no_call_ever_names_them():
    client = InProcessClient(store_config())
    parent = client.create(lease_seconds=0.2).seq_id
    child = client.fork(parent).seq_id
    time.sleep(0.3)
    assert sorted(client.expire_leases()) == sorted([parent, child])


@pytest.mark.parametrize("lease", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_lease_must_be_a_positive_number_of_seconds(lease):
    with pytest.raises(InvalidParameter, match="lease_seconds"):
        InProcessClient(store_config()).create(lease_seconds=lease)


def test_the_sequences_of_a_client_killed_mid_stream_are_reclaimed_within_the_lease_and_a_second():
    server = Server(store_config(), ServerOptions(port=0, workers=4, grace_seconds=1))
    server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        script = textwrap.dedent(f"""
            import sys, time, torch
            from kvcache import RemoteClient
            c = RemoteClient({target!r}, timeout=10)
            for _ in range(3):
                s = c.create(lease_seconds=1.0).seq_id
                c.append(s, torch.randn((2, 9, 2, 16)), torch.randn((2, 9, 2, 16)))
            print("ready", flush=True)
            while True:
                c.attend([s], 0, torch.randn((1, 4, 16)))  # mid-stream when killed
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO_ROOT,
                                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert child.stdout.readline().strip() == b"ready"
        with RemoteClient(target, timeout=10) as client:
            assert client.stats()["pool"]["sequences"] == 3
            time.sleep(0.3)
            child.send_signal(signal.SIGKILL)
            child.wait()
            killed_at = time.monotonic()
            while client.stats()["pool"]["sequences"] and time.monotonic() - killed_at < 5:
                time.sleep(0.05)
            took = time.monotonic() - killed_at
            pool = client.stats()["pool"]
            assert pool["sequences"] == 0 and pool["sequences_expired"] == 3
            assert took < 1.0 + 1.0, f"reclaimed {took:.2f} s after the kill"
            assert pool["pages_free"] == pool["pages_total"]
    finally:
        server.drain_and_stop()
