"""The soak: 32 clients against one server for a bounded minute with faults injected (client processes killed with
SIGKILL, append streams stalled, bytes of the disk tier flipped, bad input of every kind), their attends over the
server's local data plane. Nothing wrong is served (every read-back and every attention output checked against what
its client wrote; DATA_LOSS is the only other answer a hit sequence may get), Health always answers, and afterwards
every page is free again, the killed clients' sequences reclaimed by their leases, and the server's memory back near
where it started."""

from __future__ import annotations

import pytest

from kvcache.bench.soak import run

pytestmark = pytest.mark.service


def test_a_minute_of_32_clients_with_faults_serves_nothing_wrong_and_keeps_nothing():
    report = run(clients=32, processes=4, seconds=60.0, seed=1)
    assert report["problems"] == []
    assert report["health_failures"] == 0
    faults = report["faults"]
    assert faults["client_kills"] >= 3 and faults["disk_bytes_flipped"] >= 5
    assert faults["stalled_append_streams"] >= 1 and faults["bad_inputs"] >= 20
    assert report["sequences_verified"] >= 100
    assert report["attends_by_transport"]["AttendLocal"] >= 100  # the clients' attends took the local data plane
    after = report["pool_after"]
    assert after["sequences"] == 0 and after["pages_free"] == after["pages_total"]
    assert after["sequences_expired"] >= 1  # the killed clients' leased sequences
    assert after["pages_quarantined"] >= 1  # some flipped bytes landed in live pages, and were caught
    assert report["memory_after_bytes"] <= report["memory_before_bytes"] * 1.15
    assert report["server_exit_code"] == 0
