"""A/B of how SparQ's kernels keep loads in flight, on a GPU: `python -m kvcache.bench.sparq_pipeline_ab --json PATH`.

Variants: stage 1 with its loads in step or one step ahead (kernels/sparq.py STAGE1_PREFETCH), and Triton's
pipeline depth (num_stages) of stage 1 and of stage 2 (kernels/tuning.py). For each variant and shape (128K x 1,
32K x 1, 128K x 8; 32 q / 8 kv heads, d=128, bf16, pages of 16): the whole SparQ step at r=16, k=S/16, stage 1 and
stage 2 alone, in interleaved rounds; then each kernel's device time in a step (torch profiler). SDPA on contiguous
K/V (the faster of graph and eager) is the baseline row of each shape. CUDA graphs, CUDA events, L2 flushed, median
of 30.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

from kvcache.bench.decode import Shape, _sdpa_call, build_store, planned_call
from kvcache.bench.timing import Timer, run_header, write_report
from kvcache.kernels import sparq as ks
from kvcache.kernels.tuning import TUNING

# name: (stage 1 loads a step ahead, stage 1's num_stages, stage 2's num_stages)
VARIANTS = {
    "in_step": (False, 3, 3),
    "ahead": (True, 3, 3),
    "ahead_s1_stages2": (True, 2, 3),
    "ahead_s1_stages4": (True, 4, 3),
    "in_step_s1_stages4": (False, 4, 3),
    "ahead_s2_stages2": (True, 3, 2),
    "ahead_s2_stages4": (True, 3, 4),
}
SHAPES = ((1, 131072), (1, 32768), (8, 131072))


def kernel_times(step, runs: int = 10) -> dict[str, float]:
    """Each kernel's device time in microseconds per step, over `runs` eager steps (torch profiler)."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / runs for e in prof.key_averages() if e.device_time_total > 0}


def _apply(variant: tuple[bool, int, int], saved: dict) -> None:
    prefetch, s1, s2 = variant
    ks.STAGE1_PREFETCH = prefetch
    TUNING["stage1"] = dataclasses.replace(saved["stage1"], num_stages=s1)
    TUNING["rows"] = dataclasses.replace(saved["rows"], num_stages=s2)


def main() -> int:
    """Run every variant on every shape and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dev = torch.device("cuda")
    timer, eager = Timer(dev, iters=30), Timer(dev, iters=30, use_graphs=False)
    report = {**run_header(dev), "variants": VARIANTS, "rows": []}
    saved = dict(TUNING)
    for batch, context in SHAPES:
        shape = Shape(batch, context)
        store, seqs = build_store(shape, dev)
        q = torch.randn((batch, shape.num_q_heads, shape.head_dim), device=dev).to(shape.dtype)
        sdpa = _sdpa_call(store, seqs, q, shape)[0]
        sdpa_us = min(timer.median_us(sdpa), eager.median_us(sdpa))
        report["rows"].append({"batch": batch, "context": context, "name": "sdpa", "time_us": sdpa_us})
        csr, view, vbar = store.page_table(seqs, 0), store.layer_view(0), store.value_mean(seqs, 0)
        k = context // 16
        params = {"r": 16, "k": k, "local_window": k // 4}
        for rnd in range(args.rounds):
            for name, variant in VARIANTS.items():
                _apply(variant, saved)
                s1 = ks.sparq_stage1(q, view.k_dim, csr, 16)
                positions = ks.sparq_select(s1, csr, shape.num_kv_heads, k, k // 4)
                times = {
                    "step_us": timer.median_us(planned_call(store, seqs, q, "sparq", params)),
                    "stage1_us": timer.median_us(lambda: ks.sparq_stage1(q, view.k_dim, csr, 16)),
                    "stage2_us": timer.median_us(
                        lambda s1=s1, positions=positions: ks.sparq_stage2(q, view.k_seq, view.v_seq, vbar, csr, s1,
                                                                           positions)),
                }
                row = {"batch": batch, "context": context, "round": rnd, "variant": name, **times,
                       "speedup_vs_sdpa": sdpa_us / times["step_us"]}
                report["rows"].append(row)
                print(batch, context, rnd, f"{name:<20}", {key: round(v, 1) for key, v in times.items()},
                      f"{row['speedup_vs_sdpa']:.2f}x", flush=True)
        for name in ("in_step", "ahead"):  # where a step's time goes, kernel by kernel
            _apply(VARIANTS[name], saved)
            report["rows"].append({"batch": batch, "context": context, "variant": name,
                                   "kernels_us": kernel_times(planned_call(store, seqs, q, "sparq", params))})
            print(batch, context, name, {key[:24]: round(v, 1) for key, v in report["rows"][-1]["kernels_us"].items()})
        TUNING.update(saved)
        del store
        torch.cuda.empty_cache()
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
