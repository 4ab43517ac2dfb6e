"""Timing helpers for benchmarks: CUDA events around CUDA-graph replays with L2 flushed, median of many."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


class Timer:
    """Times a zero-argument callable on one device; median microseconds of `iters` runs."""

    def __init__(self, device: torch.device, iters: int = 50, warmup: int = 3, use_graphs: bool = True) -> None:
        self.device = device
        self.iters = iters
        self.warmup = warmup
        self.cuda = device.type == "cuda"
        self.use_graphs = use_graphs and self.cuda
        # Larger than any L2 (50 MB on H100): written before each timed run so no run starts warm.
        self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None

    def median_us(self, fn: Callable[[], object]) -> float:
        """Median wall time of fn in microseconds (CUDA events on the GPU, perf_counter on the CPU)."""
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
        run = fn
        if self.use_graphs:
            # Decode steps are replayed as CUDA graphs in serving engines; a graph also keeps
            # Python launch overhead out of a measurement of GPU time.
            torch.cuda.synchronize()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        times = []
        for _ in range(self.iters):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def copy_bandwidth(self, nbytes: int = 2**30) -> float:
        """Device copy bandwidth in bytes/s: (read + write) / time of a large tensor copy."""
        n = nbytes if self.cuda else min(nbytes, 2**29)  # past any L3, yet quick on a small machine
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        us = self.median_us(lambda: dst.copy_(src))
        return 2 * n / (us * 1e-6)


def run_header(device: torch.device) -> dict:
    """What every benchmark report starts with: the device, the versions and the command that made it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }


def write_report(report: dict, path: str | None) -> None:
    """Write a benchmark's report as JSON to `path` (if given) and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {path}")


def median_ms(fn: Callable[[], object], iters: int, device: torch.device, burst: int = 1) -> float:
    """Median milliseconds per call of `iters` timings of `burst` back-to-back calls of fn, after one warm-up call:
    CUDA events around each burst on the GPU (waited for at its end), perf_counter on the CPU."""
    fn()
    return statistics.median(_once_ms(fn, device, burst) for _ in range(iters))


def gpu_ms_per_call(fn: Callable[[], object], iters: int, device: torch.device) -> float | None:
    """Milliseconds of GPU kernel time per call of fn (the profiler's device time of every kernel, summed over
    `iters` calls), or None off CUDA or where the profiler saw no kernels. Divided by the call's wall time, it is
    the fraction of the call the GPU is busy."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    # Kernels, copies and memsets each appear once as a device event; their spans are device time.
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    if busy_us == 0:  # profilers that attach device time to the launching host events only
        busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                      for e in prof.key_averages())
    return busy_us / 1e3 / iters if busy_us > 0 else None


def interleaved_ms(fns: dict, iters: int, device: torch.device, burst: int | dict = 1) -> dict:
    """Median milliseconds per call of each of several zero-argument callables, timed in rounds (in each round,
    `burst` back-to-back calls of each, in order, each callable after one warm-up call), as median_ms times one.
    `burst` may give each callable its own count (a dict by the same keys): one whose calls do some work only every
    n calls times bursts of n, so that every burst holds it once.

    With burst > 1 nothing waits for the GPU between a callable's calls: a decode loop's host work for one step
    overlaps the GPU's work on the one before, as it does in an engine, and the time is the loop's per step."""
    for fn in fns.values():
        fn()
    times: dict = {key: [] for key in fns}
    for _ in range(iters):
        for key, fn in fns.items():
            times[key].append(_once_ms(fn, device, burst[key] if isinstance(burst, dict) else burst))
    return {key: statistics.median(t) for key, t in times.items()}


def _once_ms(fn: Callable[[], object], device: torch.device, burst: int = 1) -> float:
    """Milliseconds per call of `burst` back-to-back calls of fn: CUDA events around them (waited for once, at the
    end) on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(burst):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / burst
    t0 = time.perf_counter()
    for _ in range(burst):
        fn()
    return (time.perf_counter() - t0) * 1e3 / burst
