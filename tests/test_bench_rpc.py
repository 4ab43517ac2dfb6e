"""`kvcache bench rpc` runs end to end on the CPU at a small size and reports every row it names."""

import json
import os

import pytest

from kvcache.cli import main
from kvcache.service.serve_cli import pin_process


def test_bench_rpc_reports_every_client_and_concurrent_engine_processes(tmp_path):
    out = tmp_path / "rpc.json"
    assert main(["bench", "rpc", "--context", "40", "--batch", "1,2", "--steps", "1", "--engines", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["client"], r["batch"]) for r in rows] == [
        ("in-process", 1), ("shared", 1), ("grpc-stream", 1), ("grpc-unary", 1), ("in-process-planned", 1),
        ("grpc-stream-planned", 1), ("pool", 1),
        ("in-process", 2), ("shared", 2), ("grpc-stream", 2), ("in-process-planned", 2), ("grpc-stream-planned", 2),
        ("pool", 2), ("grpc-stream x2 engine processes", 1)]
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
    by = {(r["client"], r["batch"]): r for r in rows}
    for (client, batch), r in by.items():
        if client in ("shared", "grpc-stream", "grpc-unary"):
            assert r["added_ms_per_layer_call"] == r["layer_call_ms"] - by[("in-process", batch)]["layer_call_ms"]
        if client == "grpc-stream-planned":  # against the in-process step planned the same way
            planned = by[("in-process-planned", batch)]
            assert r["added_ms_per_layer_call"] == r["layer_call_ms"] - planned["layer_call_ms"]
        if client == "pool":
            assert r["added_ms_per_step"] == r["step_ms"] - by[("in-process-planned", batch)]["step_ms"]
    assert rows[-1]["engines"] == 2 and rows[-1]["wall_tokens_per_s"] > 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_bench_rpc_pins_server_and_engines_where_asked(tmp_path):
    out = tmp_path / "rpc.json"
    mine = os.sched_getaffinity(0)
    cpu = str(min(mine))  # one this process may use (CI machines may not offer CPU 0)
    try:
        assert main(["bench", "rpc", "--context", "20", "--batch", "1", "--steps", "1", "--engines", "1",
                     "--server-cpus", cpu, "--engine-cpus", cpu, "--json", str(out)]) == 0
        assert os.sched_getaffinity(0) == {int(cpu)}  # the bench process (and the engines it spawns) on --engine-cpus
    finally:
        pin_process(sorted(mine))  # every thread of this process, as the bench pinned them all
    report = json.loads(out.read_text())
    assert (report["server_cpus"], report["engine_cpus"]) == (cpu, cpu)
    assert [r["client"] for r in report["rows"]][:3] == ["in-process", "shared", "grpc-stream"]


def test_bench_rpc_floor_reports_the_wire_the_host_wait_and_their_sum(tmp_path):
    out = tmp_path / "floor.json"
    assert main(["bench", "rpc-floor", "--calls", "30", "--context", "40", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for row in ("wire", "in_process", "in_process_waited"):
        assert 0 < report[row]["p10_us"] <= report[row]["median_us"] <= report[row]["p90_us"]
    assert report["host_wait_us"] == report["in_process_waited"]["median_us"] - report["in_process"]["median_us"]
    assert report["floor_added_us"] == report["wire"]["median_us"] + max(0.0, report["host_wait_us"])
    assert report["goal_us"] == 200.0 and report["calls"] == 30 and report["context"] == 40


def test_bench_rpc_floor_with_server_work_reports_the_paced_round_trip_without_it(tmp_path, monkeypatch):
    from kvcache.bench import rpc_floor

    holds = []

    def wire_times(device, server_cpus, calls, hold):  # round trips of 250..269 us on top of the server's work
        holds.append(hold)
        return [hold + (250 + i % 20) * 1e-6 for i in range(calls)]

    monkeypatch.setattr(rpc_floor, "_wire_times", wire_times)
    out = tmp_path / "floor.json"
    assert main(["bench", "rpc-floor", "--calls", "20", "--context", "40", "--hold-us", "3000",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert holds == [0.0, 0.003]  # back to back, then after 3 ms of server work
    paced = report["wire_paced"]
    assert paced["hold_us"] == 3000.0
    # The 3 ms of work are subtracted: what is left is the round trip itself.
    assert paced["p10_us"] == pytest.approx(252.0) and paced["median_us"] == pytest.approx(259.5)
    assert paced["p90_us"] == pytest.approx(268.0) and report["wire"]["median_us"] == pytest.approx(259.5)
