"""Dense decode attention on a CPU store: the CPU path (kvcache.methods.dense_cpu) against the torch reference.

`kvcache bench dense-cpu [--context 4096,32768] [--threads N] [--json PATH]`: one layer's decode query against
one sequence per row, both paths on the same store, medians of --iters calls, in float16 and float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvcache.bench.timing import run_header
from kvcache.config import KVCacheConfig
from kvcache.methods import dense
from kvcache.methods.dense import dense_cpu
from kvcache.store import KVStore

# (name, q heads, kv heads, head dim)
SHAPES = (("SmolLM2-135M", 9, 3, 64), ("Llama-3-8B", 32, 8, 128))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache bench dense-cpu`."""
    p.add_argument("--context", default="4096,32768", help="comma-separated cached positions")
    p.add_argument("--dtypes", default="float16,float32")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per path and row (median reported)")
    p.add_argument("--json", help="write the report here")


def _medians_ms(fns: list, iters: int) -> list[float]:
    """Median milliseconds of each function, called in turn each round: both see the same machine state (on a
    shared VM, memory reclaim and neighbours shift timings by 2x between minutes)."""
    for fn in fns:
        fn()  # warm
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def run(contexts: list[int], dtypes: list[str], iters: int) -> list[dict]:
    """Rows: per shape, context and dtype, the milliseconds of each path and the reference's over the CPU path's."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, hq, hkv, d in SHAPES:
        for S in contexts:
            for dtype in dtypes:
                config = KVCacheConfig(num_layers=1, num_kv_heads=hkv, head_dim=d, page_size=16, dtype=dtype,
                                       device="cpu", device_pages=S // 16 + 8)
                store = KVStore(config)
                seq = store.create().seq_id
                for start in range(0, S, 4096):
                    T = min(4096, S - start)
                    k, v = (torch.randn((T, hkv, d), generator=gen).to(config.dtype) for _ in range(2))
                    store.append(seq, k, v, layer=0)
                q = torch.randn((1, hq, d), generator=gen).to(config.dtype)
                view, csr = store.layer_view(0), store.page_table([seq], 0)
                cpu, ref = _medians_ms([lambda: dense_cpu(q, view.k_seq, view.v_seq, csr),
                                        lambda: dense(q, view.k_seq, view.v_seq, csr)], iters)
                row = {"shape": name, "context": S, "dtype": dtype, "cpu_path_ms": cpu, "reference_ms": ref,
                       "speedup": ref / cpu, "bytes": 2 * S * hkv * d * config.itemsize}
                print(f"{name:<13} {S:>7} {dtype:<8} cpu path {cpu:8.2f} ms  reference {ref:8.2f} ms  "
                      f"{ref / cpu:5.2f}x  ({row['bytes'] / cpu / 1e6:.1f} GB/s of K/V)", flush=True)
                rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    """Entry of `kvcache bench dense-cpu`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {**run_header(torch.device("cpu")), "threads": torch.get_num_threads(),
              "rows": run([int(c) for c in args.context.split(",")], args.dtypes.split(","), args.iters)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
