"""Launch sweep of SparQ's kernels on a GPU: `python -m bench.sparq_sweep --json PATH`.

At 128K x 1 (32 q / 8 kv heads, d=128, bf16, page 16) it times, with kernels/tuning.py's entries
replaced one at a time: the selection (scoring pass + radix top-k) over topk launches and scoring
block sizes, and stage 1 over its launches at r=16 and r=32; then the whole SparQ step with the
per-kernel device times (torch profiler). CUDA graphs, CUDA events, L2 flushed, median of 30.
The committed table came from bench/results/sparq_sweep_h200.json.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bench.decode import Shape, _sdpa_call, build_store, planned_call
from bench.timing import Timer, run_header
from kernels import sparq as ks
from kernels.tuning import TUNING, Launch


def main() -> int:
    """Run the sweep and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--context", type=int, default=131072)
    args = parser.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, iters=30)
    report = {**run_header(dev), "rows": []}

    def row(name: str, params: dict, us: float) -> None:
        report["rows"].append({"name": name, "params": params, "time_us": us})
        print(name, params, round(us, 1), flush=True)

    S = args.context
    shape = Shape(1, S)
    store, seqs = build_store(shape, dev)
    q = torch.randn((1, shape.num_q_heads, shape.head_dim), device=dev).to(shape.dtype)
    csr, view = store.page_table(seqs, 0), store.layer_view(0)
    row("sdpa", {}, timer.median_us(_sdpa_call(store, seqs, q, shape)[0]))
    k = S // 16
    s1 = ks.sparq_stage1(q, view.k_dim, csr, 16)
    saved = dict(TUNING)
    for bn, nw, pr in itertools.product((256, 512, 1024, 2048), (1, 2, 4), (264, 528, 1056)):
        TUNING["topk"] = Launch(bn, nw, pr)
        us = timer.median_us(lambda: ks.sparq_select(s1, csr, 8, k, k // 4))
        row("select.topk", {"bn": bn, "nw": nw, "pr": pr}, us)
    TUNING.update(saved)
    for bn in (128, 256, 512, 1024):
        us = timer.median_us(lambda bn=bn: ks.sparq_select(s1, csr, 8, k, k // 4, block_n=bn))
        row("select.scores", {"bn": bn}, us)
    for r in (16, 32):
        name = "stage1" if r <= 16 else "stage1_wide"
        for bn, nw, pr in itertools.product((128, 256, 512), (2, 4), (264, 528)):
            TUNING[name] = Launch(bn, nw, pr)
            us = timer.median_us(lambda r=r: ks.sparq_stage1(q, view.k_dim, csr, r))
            row(name, {"r": r, "bn": bn, "nw": nw, "pr": pr}, us)
        TUNING.update(saved)
    for r, div in ((16, 16), (32, 8)):
        params = {"r": r, "k": S // div, "local_window": S // div // 4}
        call = planned_call(store, seqs, q, "sparq", params)
        row("sparq", params, timer.median_us(call))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        report["rows"].append({"name": "sparq.kernels_us", "params": params, "kernels_us": {
            e.key: e.device_time_total / 10 for e in prof.key_averages() if e.device_time_total > 0}})
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
