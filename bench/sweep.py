"""What the launch sweeps (bench/sparq_sweep.py, bench/gate_sweep.py) share: their flags, the store
they time on, the rows they print and the per-kernel profile of a whole step."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from kvcache.bench.decode import Shape, _sdpa_call, build_store
from kvcache.bench.timing import Timer, run_header


class Sweep:
    """A sweep on the GPU: a store of `--batch` sequences of `--context` random positions (bf16, page 16), a query, a
    timer (CUDA graphs, L2 flushed, median of 30) and the report's rows; SDPA on contiguous K/V is the first row."""

    def __init__(self, description: str) -> None:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--json", required=True)
        parser.add_argument("--context", type=int, default=131072)
        parser.add_argument("--batch", type=int, default=1)
        self.args = parser.parse_args()
        dev = torch.device("cuda")
        self.timer = Timer(dev, iters=30)
        self.report = {**run_header(dev), "batch": self.args.batch, "context": self.args.context, "rows": []}
        self.context = self.args.context
        self.shape = Shape(self.args.batch, self.context)
        self.store, self.seqs = build_store(self.shape, dev)
        shape = self.shape
        self.q = torch.randn((shape.batch, shape.num_q_heads, shape.head_dim), device=dev).to(shape.dtype)
        self.time("sdpa", {}, _sdpa_call(self.store, self.seqs, self.q, self.shape)[0])

    def row(self, name: str, params: dict, us: float) -> None:
        """Record and print one timing (microseconds)."""
        self.report["rows"].append({"name": name, "params": params, "time_us": us})
        print(name, params, round(us, 2), flush=True)

    def time(self, name: str, params: dict, fn: Callable[[], object]) -> float:
        """Time fn, record it as a row and return its microseconds."""
        us = self.timer.median_us(fn)
        self.row(name, params, us)
        return us

    def profile_kernels(self, name: str, params: dict, step: Callable[[], object], runs: int = 10) -> None:
        """Record each kernel's device time (microseconds per step) over `runs` eager steps."""
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                step()
            torch.cuda.synchronize()
        self.report["rows"].append({"name": name, "params": params, "kernels_us": {
            e.key: e.device_time_total / runs for e in prof.key_averages() if e.device_time_total > 0}})

    def write(self) -> int:
        """Write the report to --json; the process exit code."""
        with open(self.args.json, "w") as f:
            json.dump(self.report, f, indent=1)
        return 0
