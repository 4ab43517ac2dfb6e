"""In-process versus remote: latency of a decode step's layer calls and steps per second as batches grow, over the
local data plane (a Unix socket, same host), a gRPC stream and unary gRPC calls; and planned steps in process
against the same steps leased on the server's shared page pool (`kvcache serve --share-pool`), which send no layer
call at all.

A decode step of a SmolLM2-135M-shaped model (30 layers, 9 q heads, 3 kv heads, d=64): for every
layer, one attend call carrying the new token's q, k, v for every sequence of the batch.
`kvcache bench rpc` starts a `kvcache serve` on loopback, measures both clients in one run and
writes JSON.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from kvcache.clients.inprocess import InProcessClient
from kvcache.clients.remote import RemoteClient
from kvcache.config import KVCacheConfig
from kvcache.service.serve_cli import parse_cpus, pin_process

SHAPE = {"num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}


def start_server(config: KVCacheConfig, cpus: str | None = None) -> tuple[subprocess.Popen, int]:
    """A `kvcache serve` subprocess with `config` on a free loopback port (on `cpus`, if given), its pool shared.

    Its log (one line per call) goes to a file, not a pipe: a thread of this process reading the pipe would wake at
    every layer call and take this process's GIL and core from the engine being timed."""
    cmd = [sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", "--layers", str(config.num_layers),
           "--kv-heads", str(config.num_kv_heads), "--head-dim", str(config.head_dim),
           "--page-size", str(config.page_size), "--dtype", str(config.dtype).removeprefix("torch."),
           "--pages", str(config.device_pages), "--workers", "8", "--torch-threads", "1",
           "--device", str(config.device), "--share-pool", *(("--cpus", cpus) if cpus else ())]
    with tempfile.TemporaryFile() as log:  # the server keeps writing to it once this process lets go of it
        proc = subprocess.Popen(cmd, stdout=log)
        read, pending = 0, b""
        while proc.poll() is None:
            chunk = os.pread(log.fileno(), 1 << 16, read)
            if not chunk:
                time.sleep(0.01)
                continue
            read += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                event = json.loads(line)
                if event.get("event") == "listening":
                    return proc, event["port"]
    raise RuntimeError("kvcache serve exited before listening")


def fill(client, batch: int, context: int, config: KVCacheConfig, chunk: int = 512) -> list[str]:
    """`batch` sequences of `context` random positions in every layer."""
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(batch):
        seq = client.create().seq_id
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            shape = (config.num_layers, n, config.num_kv_heads, config.head_dim)
            client.append(seq, torch.randn(shape, generator=gen).to(config.dtype),
                          torch.randn(shape, generator=gen).to(config.dtype))
        seqs.append(seq)
    return seqs


def decode_steps(client, seqs: list[str], config: KVCacheConfig, steps: int,
                 planned: bool = False) -> tuple[list[float], list[float]]:
    """Run `steps` decode steps, each layer an attend call (or, `planned`, the step begun once with begin_step);
    (seconds per layer call, seconds per step)."""
    B = len(seqs)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((B, SHAPE["num_q_heads"], config.head_dim), generator=gen).to(config.dtype)
    kv = torch.randn((2, B, config.num_kv_heads, config.head_dim), generator=gen).to(config.dtype)
    layer_times, step_times = [], []
    for _ in range(steps):
        t_step = time.perf_counter()
        step = client.begin_step(seqs, SHAPE["num_q_heads"]) if planned else None
        for layer in range(config.num_layers):
            t = time.perf_counter()
            if step is not None:
                step.attend(layer, q, kv[0], kv[1])
            else:
                client.attend(seqs, layer, q, "dense", new_k=kv[0], new_v=kv[1])
            layer_times.append(time.perf_counter() - t)
        step_times.append(time.perf_counter() - t_step)
    return layer_times, step_times


def run(context: int = 4096, batches: tuple[int, ...] = (1, 8, 32), steps: int = 5, engines: int = 4,
        device: str = "cpu", server_cpus: str | None = None, engine_cpus: str | None = None) -> dict:
    """Both clients at each batch size, plus `engines` concurrent remote engine processes; returns the report.
    With server_cpus / engine_cpus the server and this process (its engine processes inherit it) run on
    those CPUs.

    Engine and server share this machine's cores, so both run torch with one intra-op thread:
    otherwise each process's spinning OpenMP workers steal the other's cores and the comparison
    measures contention, not the wire."""
    if engine_cpus:
        pin_process(parse_cpus(engine_cpus))
    torch.set_num_threads(1)
    pages = (max(batches) + engines) * (-(-(context + 64 * steps) // 16)) + 64
    config = KVCacheConfig(num_layers=SHAPE["num_layers"], num_kv_heads=SHAPE["num_kv_heads"],
                           head_dim=SHAPE["head_dim"], page_size=16, dtype="float16", device=device,
                           device_pages=pages)
    import grpc

    report = {"shape": SHAPE, "context": context, "dtype": "float16", "steps": steps, "machine": platform.machine(),
              "device": torch.cuda.get_device_name() if config.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "grpcio": grpc.__version__, "python": platform.python_version(),
              # grpc core settings of this process and of the server it starts (kvcache/wire/transport.py)
              "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS"),
              "server_cpus": server_cpus, "engine_cpus": engine_cpus,
              "command": " ".join(sys.argv), "rows": []}
    proc, port = start_server(config, server_cpus)
    try:
        local = InProcessClient(config)
        # The gRPC rows send their layer calls over gRPC: "auto" would take the local data plane ("shared").
        stream = RemoteClient(f"127.0.0.1:{port}", data_plane="grpc")
        unary = RemoteClient(f"127.0.0.1:{port}", use_stream=False, data_plane="grpc")
        shared = RemoteClient(f"127.0.0.1:{port}", data_plane="shared", share_pool=False)
        pool = RemoteClient(f"127.0.0.1:{port}", data_plane="shared")
        print(f"{'client':<12} {'batch':>5} {'layer call ms':>14} {'step ms':>9} {'steps/s':>8} {'tokens/s':>9}")
        for batch in batches:
            # The unary client shares the stream client's sequences (same server); unary at batch 1 only.
            local_seqs = fill(local, batch, context, config)
            remote_seqs = fill(stream, batch, context, config)
            runners = {"in-process": (local, local_seqs, False), "shared": (shared, remote_seqs, False),
                       "grpc-stream": (stream, remote_seqs, False),
                       **({"grpc-unary": (unary, remote_seqs, False)} if batch == 1 else {}),
                       "in-process-planned": (local, local_seqs, True),
                       "grpc-stream-planned": (stream, remote_seqs, True), "pool": (pool, remote_seqs, True)}
            timings = {name: ([], []) for name in runners}
            # Steps alternate between the clients, so load from other processes falls on all alike.
            for step in range(steps + 1):  # step 0 warms up
                for name, (client, seqs, planned) in runners.items():
                    layer_t, step_t = decode_steps(client, seqs, config, 1, planned)
                    if step:
                        timings[name][0].extend(layer_t)
                        timings[name][1].extend(step_t)
            for name, (layer_t, step_t) in timings.items():
                report["rows"].append(_row(name, batch, layer_t, step_t))
            for seq in local_seqs:
                local.free(seq)
            for seq in remote_seqs:
                stream.free(seq)
        stream.close()
        unary.close()
        shared.close()
        pool.close()
        report["rows"].append(_concurrent(port, config, context, steps, engines))
        base = {r["batch"]: r for r in report["rows"] if r["client"] == "in-process"}
        planned = {r["batch"]: r for r in report["rows"] if r["client"] == "in-process-planned"}
        for r in report["rows"]:
            if r["client"] in ("shared", "grpc-stream", "grpc-unary"):
                r["added_ms_per_layer_call"] = r["layer_call_ms"] - base[r["batch"]]["layer_call_ms"]
                r["step_time_ratio_vs_in_process"] = r["step_ms"] / base[r["batch"]]["step_ms"]
            if r["client"] == "grpc-stream-planned":  # as an engine's decode step calls: a Plan RPC, then the layers
                r["added_ms_per_layer_call"] = r["layer_call_ms"] - planned[r["batch"]]["layer_call_ms"]
                r["step_time_ratio_vs_in_process"] = r["step_ms"] / planned[r["batch"]]["step_ms"]
            if r["client"] == "pool":  # no layer call crosses: what it adds is per step (the lease and commit)
                r["added_ms_per_step"] = r["step_ms"] - planned[r["batch"]]["step_ms"]
                r["step_time_ratio_vs_in_process"] = r["step_ms"] / planned[r["batch"]]["step_ms"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return report


def _row(name: str, batch: int, layer_t: list[float], step_t: list[float]) -> dict:
    row = {"client": name, "batch": batch, "layer_call_ms": statistics.median(layer_t) * 1e3,
           "step_ms": statistics.median(step_t) * 1e3}
    row["steps_per_s"] = 1e3 / row["step_ms"]
    row["tokens_per_s"] = row["steps_per_s"] * batch
    print(f"{name:<12} {batch:>5} {row['layer_call_ms']:>14.3f} {row['step_ms']:>9.1f} {row['steps_per_s']:>8.2f} "
          f"{row['tokens_per_s']:>9.1f}")
    return row


def _engine(target: str, config: KVCacheConfig, context: int, steps: int, barrier, results, index: int) -> None:
    """One engine process: its own connection and sequence; sends (index, step seconds) when done."""
    torch.set_num_threads(1)
    with RemoteClient(target, data_plane="grpc") as client:
        seqs = fill(client, 1, context, config)
        barrier.wait()
        _, step_t = decode_steps(client, seqs, config, steps)
        client.free(seqs[0])
    results.put((index, step_t))


def _concurrent(port: int, config: KVCacheConfig, context: int, steps: int, engines: int) -> dict:
    """`engines` engine processes, each its own connection and one sequence, decoding at the same time.

    Processes, not threads: engines in one Python process would queue on its GIL, and the row would
    measure the client process rather than the server."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(engines + 1), ctx.Queue()
    procs = [ctx.Process(target=_engine, args=(f"127.0.0.1:{port}", config, context, steps, barrier, results, i))
             for i in range(engines)]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)
    t0 = time.perf_counter()
    step_times = [results.get(timeout=600)[1] for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(60)
    step_ms = statistics.median([t for r in step_times for t in r]) * 1e3
    # tokens_per_s is the steady rate (engines / median step); wall_tokens_per_s counts the slowest engine's
    # stragglers too (the first batches of new sizes make Triton specialise its kernels on the server).
    row = {"client": f"grpc-stream x{engines} engine processes", "batch": 1, "engines": engines,
           "steps_per_s": engines * 1e3 / step_ms, "tokens_per_s": engines * 1e3 / step_ms,
           "wall_tokens_per_s": engines * steps / wall, "step_ms": step_ms}
    print(f"{row['client']:<12} {'1':>5} {'':>14} {row['step_ms']:>9.1f} {row['steps_per_s']:>8.2f} "
          f"{row['tokens_per_s']:>9.1f}")
    return row


def main(args) -> int:
    """Entry of `kvcache bench rpc`."""
    report = run(args.context, tuple(int(b) for b in args.batch.split(",")), args.steps, args.engines, args.device,
                 args.server_cpus, args.engine_cpus)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
