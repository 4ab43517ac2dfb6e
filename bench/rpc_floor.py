"""The least a remote layer call can add over an in-process one, measured without kvcache's server.

Two floors, measured in one run on one machine (`kvcache bench rpc-floor`):
- the wire: an attend-shaped message (a SmolLM2-135M layer's q, k, v at batch 1, float16) to a bare
  AttendStream handler that only decodes it and answers out and lse, over grpcio on loopback. The client
  sends and reads as RemoteClient does: a queue-fed request iterator, the reply read on the calling
  thread. With --device cuda the handler also moves q, k, v to the device and out and lse back, as a
  server with a CUDA store must. With --hold-us the same round trip is timed again with the bare server
  working that long before each answer (subtracted): a real attend keeps the client waiting, its thread and
  core idle, and the back-to-back round trip never pays for waking them;
- the result on the host: an in-process layer call of a store of --context positions, against the
  same call followed by waiting for its kernels and copying out and lse to the host. Every remote call
  does that wait; an in-process engine never needs it.

Their sum is a lower bound on what gRPC adds per layer call; `kvcache bench rpc` measures what it does
add. Host wall times (perf_counter), medians: these are round trips between processes, not kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import subprocess
import sys
import time
from concurrent import futures

from kvcache.wire.transport import prefer_low_latency_core

prefer_low_latency_core()  # as kvcache serve and RemoteClient do, before grpc loads

import grpc  # noqa: E402
import torch  # noqa: E402

from kvcache.bench.rpc import SHAPE, fill  # noqa: E402
from kvcache.clients.inprocess import InProcessClient  # noqa: E402
from kvcache.config import KVCacheConfig  # noqa: E402
from kvcache.service.serve_cli import parse_cpus, pin_process  # noqa: E402
from kvcache.wire import kvcache_pb2 as pb  # noqa: E402
from kvcache.wire import kvcache_pb2_grpc as pb_grpc  # noqa: E402
from kvcache.wire.codec import from_wire, to_wire  # noqa: E402

GOAL_US = 200.0  # the latency goal a streamed layer call at one sequence was held to: what gRPC may add
WARMUP = 20


class _BareAttend(pb_grpc.KVCacheServicer):
    """AttendStream with no store: decode q, k, v, (on a device, move them there), answer out = q and lse = 0;
    with `hold` seconds, first keep the CPU busy that long, as a real attend's work does."""

    def __init__(self, device: torch.device, hold: float = 0.0) -> None:
        self.device = device
        self.hold = hold

    def AttendStream(self, request_iterator, context):
        for request in request_iterator:
            if self.hold:
                until = time.perf_counter() + self.hold
                while time.perf_counter() < until:
                    pass
            q, k, v = from_wire(request.q, "q"), from_wire(request.new_k, "new_k"), from_wire(request.new_v, "new_v")
            if self.device.type != "cpu":
                q, k, v = (t.to(self.device, non_blocking=True) for t in (q, k, v))
            out = q.clone()  # one kernel, standing in for attention
            lse = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
            yield pb.AttendResponse(out=to_wire(out), lse=to_wire(lse))


def serve(device: str, cpus: str | None, hold: float = 0.0) -> None:
    """The bare server (answers after `hold` seconds of work): prints its port as one JSON line, serves until stdin
    closes."""
    if cpus:
        pin_process(parse_cpus(cpus))
    torch.set_num_threads(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_KVCacheServicer_to_server(_BareAttend(torch.device(device), hold), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()
    server.stop(0)


def wire_round_trips(port: int, calls: int) -> list[float]:
    """Seconds per attend-shaped round trip to the bare server, `calls` of them after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn((1, SHAPE["num_q_heads"], SHAPE["head_dim"]), generator=gen).half()
    k, v = torch.randn((2, 1, SHAPE["num_kv_heads"], SHAPE["head_dim"]), generator=gen).half()
    requests: queue.SimpleQueue = queue.SimpleQueue()

    def iterate():
        while (request := requests.get()) is not None:
            yield request

    times = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.KVCacheStub(channel).AttendStream(iterate())
        for i in range(WARMUP + calls):
            t = time.perf_counter()
            requests.put(pb.AttendRequest(seq_ids=["floor"], layer=i % SHAPE["num_layers"], q=to_wire(q),
                                          new_k=to_wire(k), new_v=to_wire(v), method="dense"))
            reply = next(call)
            from_wire(reply.out, "out")  # the client decodes its answer, as RemoteClient does
            from_wire(reply.lse, "lse")
            times.append(time.perf_counter() - t)
        requests.put(None)
        call.cancel()
    return times[WARMUP:]


def host_result_cost(device: str, context: int, calls: int) -> tuple[list[float], list[float]]:
    """Seconds per in-process layer call (attend with the new token's k, v) of a store of `context` positions:
    as an engine makes it, and followed by waiting for it and copying out and lse to the host; decode steps of
    every layer alternate between the two."""
    L = SHAPE["num_layers"]
    steps = 2 * -(-(WARMUP + calls) // L)
    config = KVCacheConfig(num_layers=L, num_kv_heads=SHAPE["num_kv_heads"], head_dim=SHAPE["head_dim"],
                           page_size=16, dtype="float16", device=device, device_pages=-(-(context + steps) // 16) + 8)
    client = InProcessClient(config)
    seqs = fill(client, 1, context, config)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((1, SHAPE["num_q_heads"], config.head_dim), generator=gen).to(config.dtype)
    k, v = torch.randn((2, 1, config.num_kv_heads, config.head_dim), generator=gen).to(config.dtype)
    plain, waited = [], []
    for step in range(steps):
        for layer in range(L):
            t = time.perf_counter()
            result = client.attend(seqs, layer, q, "dense", new_k=k, new_v=v)
            if step % 2:  # .cpu() waits for the kernels
                result.out.cpu()
                result.lse.cpu()
            (waited if step % 2 else plain).append(time.perf_counter() - t)
    return plain[WARMUP:WARMUP + calls], waited[WARMUP:WARMUP + calls]


def _wire_times(device: str, server_cpus: str | None, calls: int, hold: float) -> list[float]:
    """wire_round_trips to a bare server started for them (answering after `hold` seconds of work)."""
    cmd = [sys.executable, "-m", "kvcache.bench.rpc_floor", "--serve", "--device", device, "--hold", str(hold),
           *(("--server-cpus", server_cpus) if server_cpus else ())]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        return wire_round_trips(port, calls)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def _stats(times: list[float]) -> dict:
    us = sorted(t * 1e6 for t in times)
    return {"median_us": statistics.median(us), "p10_us": us[len(us) // 10], "p90_us": us[(9 * len(us)) // 10]}


def run(device: str = "cpu", context: int = 4096, calls: int = 2000, server_cpus: str | None = None,
        engine_cpus: str | None = None, hold_us: float = 0.0) -> dict:
    """Both floors and their sum against the goal; the report. With `hold_us`, the wire round trip is also timed
    with the bare server working that long before each answer (the work subtracted): the client then waits as it
    does on a real attend, and its thread and core go idle in between."""
    if engine_cpus:
        pin_process(parse_cpus(engine_cpus))
    torch.set_num_threads(1)
    wire = _wire_times(device, server_cpus, calls, 0.0)
    paced = [t - hold_us * 1e-6 for t in _wire_times(device, server_cpus, calls, hold_us * 1e-6)] if hold_us else None
    plain, waited = host_result_cost(device, context, calls)
    rows = {"wire": _stats(wire), "in_process": _stats(plain), "in_process_waited": _stats(waited)}
    if paced is not None:
        rows["wire_paced"] = {"hold_us": hold_us, **_stats(paced)}
    wait_us = rows["in_process_waited"]["median_us"] - rows["in_process"]["median_us"]
    floor = rows["wire"]["median_us"] + max(0.0, wait_us)
    host_gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report = {"device": host_gpu if device == "cuda" else f"cpu{f' (host of an {host_gpu})' if host_gpu else ''}",
              "torch": torch.__version__, "grpc": grpc.__version__, "python": platform.python_version(),
              "command": " ".join(sys.argv), "shape": SHAPE, "context": context, "calls": calls,
              "server_cpus": server_cpus, "engine_cpus": engine_cpus, **rows,
              "host_wait_us": wait_us, "floor_added_us": floor, "goal_us": GOAL_US}
    print(f"wire round trip (bare handler{', device copies' if device != 'cpu' else ''}): "
          f"{rows['wire']['median_us']:.0f} us (p10 {rows['wire']['p10_us']:.0f}, p90 {rows['wire']['p90_us']:.0f})")
    if paced is not None:
        print(f"wire round trip after {hold_us:.0f} us of server work (subtracted): "
              f"{rows['wire_paced']['median_us']:.0f} us (p10 {rows['wire_paced']['p10_us']:.0f}, "
              f"p90 {rows['wire_paced']['p90_us']:.0f})")
    print(f"in-process layer call: {rows['in_process']['median_us']:.0f} us; waited for and copied to the host: "
          f"{rows['in_process_waited']['median_us']:.0f} us (+{wait_us:.0f})")
    print(f"least gRPC can add per layer call: {floor:.0f} us (goal {GOAL_US:.0f})")
    return report


def main(args: argparse.Namespace) -> int:
    """Entry of `kvcache bench rpc-floor`."""
    report = run(args.device, args.context, args.calls, args.server_cpus, args.engine_cpus, args.hold_us)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the bare AttendStream server of kvcache bench rpc-floor")
    parser.add_argument("--serve", action="store_true", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server-cpus")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds of work before each answer")
    ns = parser.parse_args()
    serve(ns.device, ns.server_cpus, ns.hold)
