"""Launch sweep of the gate's kernels on a GPU: `python -m bench.gate_sweep --json PATH`.

At 128K x 1 (32 q / 8 kv heads, d=128, bf16, page 16, random gate weights, budget 4096) it times,
with kernels/gate_score.py's launch constants replaced one at a time: the query GEMV, the scoring
pass, scoring + page selection, and the attention over the chosen pages; then the whole step's
per-kernel device times (torch profiler). CUDA graphs, CUDA events, L2 flushed, median of 30.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch.profiler import ProfilerActivity, profile

import kernels.gate_score as gs
from bench.decode import Shape, _sdpa_call, build_store, planned_call
from bench.timing import Timer, run_header
from kernels.paged_decode import MODE_PAGES, attend_partial_and_merge
from kernels.tuning import Launch
from kvcache.gate_store import attach_gate, layer_gate_of
from kvcache.methods.gate import GateShape, PageGate
from kvcache.methods.traffic import gate_budget_pages


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
        print(name, params, round(us, 2), flush=True)

    S = args.context
    shape = Shape(1, S)
    store, seqs = build_store(shape, dev)
    attach_gate(store, PageGate(GateShape(1, shape.num_kv_heads, shape.num_q_heads // shape.num_kv_heads,
                                          shape.head_dim, shape.page_size)))
    q = torch.randn((1, shape.num_q_heads, shape.head_dim), device=dev).to(shape.dtype)
    csr, view, lg = store.page_table(seqs, 0), store.layer_view(0), layer_gate_of(store, 0)
    P, budget = shape.page_size, 4096
    budget_pages, t = budget // P, gate_budget_pages(S, P, budget)
    row("sdpa", {}, timer.median_us(_sdpa_call(store, seqs, q, shape)[0]))
    step = planned_call(store, seqs, q, "gate", {"budget": budget})
    row("gate", {"budget": budget}, timer.median_us(step))
    for bo in (2, 4, 8, 16):
        gs.QUERY_BLOCK_O = bo
        row("query", {"block_o": bo}, timer.median_us(lambda: gs.gate_queries_triton(q, lg, csr)))
    gs.QUERY_BLOCK_O = 4
    qg = gs.gate_queries_triton(q, lg, csr)
    saved = gs.SCORE_LAUNCH
    for bn, nw, pr in itertools.product((32, 64, 128), (2, 4), (528, 1056, 2112)):
        gs.SCORE_LAUNCH = Launch(bn, nw, pr)
        us = timer.median_us(lambda: gs.gate_scores_triton(qg, lg.keys, csr, budget_pages))
        row("score", {"bn": bn, "nw": nw, "pr": pr}, us)
    gs.SCORE_LAUNCH = saved

    def choose():
        _, sel, counts, ws = gs.gate_scores_triton(qg, lg.keys, csr, budget_pages)
        return gs.select_pages(sel, counts, ws, t)

    saved = gs.SELECT_LAUNCH
    for bn, nw, pr in itertools.product((512, 1024, 2048), (4, 8), (128, 256, 528)):
        gs.SELECT_LAUNCH = Launch(bn, nw, pr)
        row("score+select", {"bn": bn, "nw": nw, "pr": pr}, timer.median_us(choose))
    gs.SELECT_LAUNCH = saved
    chosen = choose()
    list_len = torch.full((shape.num_kv_heads,), t, dtype=torch.int32, device=dev)
    for bn, nw, pr in itertools.product((32, 64, 128), (4, 8), (264, 528, 1056)):
        launch = Launch(bn, nw, pr)

        def attend(launch=launch):
            return attend_partial_and_merge(q, view.k_seq, view.v_seq, csr, t * P, MODE_PAGES, item_list=chosen,
                                            list_len=list_len, launch=launch)

        row("attend", {"bn": bn, "nw": nw, "pr": pr}, timer.median_us(attend))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    report["rows"].append({"name": "gate.kernels_us", "params": {"budget": budget}, "kernels_us": {
        e.key: e.device_time_total / 10 for e in prof.key_averages() if e.device_time_total > 0}})
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
