"""What a decode step's layer call costs besides attention: the append of the new token, and the whole call.

Two parts, in one run:
  append   kvcache.kernels.append_rows against the torch path (PagePool.append_rows and the value sums) for B sequences:
           GPU time by CUDA events (graph replays, median), and wall time per call from Python.
  call     InProcessClient.attend with the new token's k, v (what an engine calls once per layer),
           wall time per call: each call waited for (synced, median) and back to back (pipelined, mean,
           the GPU queue drained once at the end), with the GPU time of its kernels alone; per call (a page
           table built for every call) and per step (plan_step once per step, its cost spread over the layers).

`kvcache bench layer-call --json PATH`. On the CPU the Triton rows are left out (the torch path runs).
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import torch

from kvcache.bench.timing import Timer, run_header
from kvcache.clients.inprocess import InProcessClient
from kvcache.config import KVCacheConfig
from kvcache.store.page_pool import PagePool

# (name, layers, q heads, kv heads, head dim, context, largest batch whose store fits an 80 GB GPU)
SHAPES = (("SmolLM2-135M", 30, 9, 3, 64, 4096, 256), ("Llama-3-8B", 32, 32, 8, 128, 32768, 8))


def _wall_us(fn, iters: int, sync: bool) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def bench_append(device: torch.device, batches: tuple[int, ...], iters: int) -> list[dict]:
    """Rows: the append of one position to B sequences, Triton kernel against the torch reference."""
    rows = []
    cuda = device.type == "cuda"
    timer = Timer(device, iters=iters)
    for name, _layers, _, hkv, d, _, _ in SHAPES:
        for B in batches:
            config = KVCacheConfig(num_layers=2, num_kv_heads=hkv, head_dim=d, page_size=16, dtype="bfloat16" if cuda
                                   else "float32", device=device, device_pages=4 * B + 8)
            pool = PagePool(config)
            k = torch.randn((B, hkv, d), device=device).to(config.dtype)
            v = torch.randn_like(k)
            where = [(2 * b + 1, 2 * b + 1, 5) for b in range(B)]  # (page, device slot, row): a page's sixth row
            table = torch.tensor(where, dtype=torch.int32).T.contiguous().to(device)
            sums = torch.zeros((B, 2, hkv, d), device=device)  # value sums [L, Hkv, d] per sequence

            def torch_path(pool=pool, k=k, v=v, where=where, sums=sums):  # what the store runs without Triton
                pool.append_rows(1, k, v, where)
                torch._foreach_add_([s[1] for s in sums], list(v.float().unbind(0)))

            paths = {"torch": torch_path}
            if cuda:
                from kvcache.kernels.append_rows import append_rows_triton

                table = torch.tensor([list(c) for c in zip(*where)] + [[s[1].data_ptr() for s in sums]],
                                     dtype=torch.int64).to(device)
                paths["triton"] = functools.partial(append_rows_triton, pool.k_seq[1], pool.v_seq[1], pool.k_dim[1],
                                                    pool.k_summary[1], k, v, table)
            for path, fn in paths.items():
                row = {"part": "append", "shape": name, "batch": B, "path": path,
                       "gpu_us": timer.median_us(fn) if cuda else None,
                       "wall_us": _wall_us(fn, iters, sync=cuda)}
                rows.append(row)
                print(f"append  {name:<13} B={B:<3} {path:<7} GPU {row['gpu_us'] or 0:8.1f} us  "
                      f"wall {row['wall_us']:8.1f} us")
    return rows


def bench_call(device: torch.device, batches: tuple[int, ...], iters: int) -> list[dict]:
    """Rows: one InProcessClient.attend with the new token's k, v, dense, per shape, batch and append path."""
    rows = []
    cuda = device.type == "cuda"
    for name, layers, hq, hkv, d, context, max_batch in SHAPES:
        if not cuda:
            context = min(context, 1024)
        for B in (b for b in batches if b <= max_batch):
            config = KVCacheConfig(num_layers=layers, num_kv_heads=hkv, head_dim=d, page_size=16,
                                   dtype="bfloat16" if cuda else "float32", device=device,
                                   device_pages=B * (context // 16 + (iters + 40 * layers) // (16 * layers) + 8) + 64)
            for row in _time_calls(config, hq, B, context, iters):
                rows.append({"part": "call", "shape": name, "batch": B, "context": context, **row})
                print(f"call    {name:<13} B={B:<3} ctx={context:<6} append {row['append']:<6} {row['plan']:<8} "
                      f"synced {row['synced_us']:8.1f} us  pipelined {row['pipelined_us']:8.1f} us  "
                      f"GPU kernels {row['gpu_kernels_us'] or 0:6.1f} us")
    return rows


def _time_calls(config: KVCacheConfig, hq: int, B: int, context: int, iters: int) -> list[dict]:
    """Layer calls on B sequences of `context` positions, with each append path the device has."""
    from kvcache.bench.rpc import fill

    cuda = config.device.type == "cuda"
    layers, hkv, d = config.num_layers, config.num_kv_heads, config.head_dim
    client = InProcessClient(config)
    seqs = fill(client, B, context, config, chunk=4096)
    q = torch.randn((B, hq, d), device=config.device).to(config.dtype)
    k = torch.randn((B, hkv, d), device=config.device).to(config.dtype)
    v = torch.randn_like(k)
    step = iter(range(10**9))
    plan = {}

    def call():
        client.attend(seqs, next(step) % layers, q, "dense", new_k=k, new_v=v)

    def planned_call():
        # A step planned at its first layer (plan_step: one page table for all layers), its cost spread over them.
        layer = next(step) % layers
        if layer == 0:
            plan["step"] = client.plan_step(seqs)
        client.attend(seqs, layer, q, "dense", new_k=k, new_v=v, plan=plan["step"])

    def finish_step():
        while client.store.lengths(seqs, 0) != client.store.lengths(seqs, layers - 1):
            call()

    rows = []
    # The store's append path: kvcache.kernels.append_rows (CUDA) or the torch reference, the baseline.
    for append in ("triton", "torch") if cuda else ("torch",):
        client.store.triton_append = append == "triton"
        # Past a page of new positions in every layer: Triton compiles a kernel again when an int
        # argument (a length) first meets another divisibility by 16, which is not what is timed.
        for _ in range((config.page_size + 1) * layers):
            call()
        synced = _wall_us(call, iters, sync=cuda)
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        if cuda:
            torch.cuda.synchronize()
        pipelined = (time.perf_counter() - t0) / iters * 1e6
        gpu = None
        if cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(layers):
                    call()
                torch.cuda.synchronize()
            gpu = sum(e.self_device_time_total for e in prof.key_averages()) / layers
        rows.append({"append": append, "plan": "per call", "synced_us": synced, "pipelined_us": pipelined,
                     "gpu_kernels_us": gpu})
        finish_step()
        planned_synced = _wall_us(planned_call, iters // layers * layers, sync=cuda)
        finish_step()
        t0 = time.perf_counter()
        for _ in range(iters // layers * layers):
            planned_call()
        if cuda:
            torch.cuda.synchronize()
        planned_pipelined = (time.perf_counter() - t0) / (iters // layers * layers) * 1e6
        rows.append({"append": append, "plan": "per step", "synced_us": planned_synced,
                     "pipelined_us": planned_pipelined, "gpu_kernels_us": None})
    return rows


def main(args) -> int:
    """Entry of `kvcache bench layer-call`."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches = tuple(int(b) for b in args.batch.split(","))
    report = {**run_header(device), "notes": "append: GPU time of CUDA-graph replays (median) and wall time per "
              "call from Python (synced); call: InProcessClient.attend with new_k/new_v, dense, wall time per call "
              "synced (median) and back to back (mean), and the GPU time of its kernels (profiler, per call)",
              "rows": bench_append(device, batches, args.iters) + bench_call(device, batches, args.iters)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
