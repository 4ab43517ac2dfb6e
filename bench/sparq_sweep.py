"""Launch sweep of SparQ's kernels on a GPU: `python -m kvcache.bench.sparq_sweep --json PATH`.

At `--context` x `--batch` (default 128K x 1; 32 q / 8 kv heads, d=128, bf16, page 16) it times, with
kernels/tuning.py's entries replaced one at a time: the selection (scoring pass + radix top-k) over topk
launches and scoring block sizes, and (at batch 1) stage 1 over its launches at r=16 and r=32; then the whole
SparQ step with the per-kernel device times (torch profiler), the scoring pass's warps, and the step at the best
top-k launch. CUDA graphs, CUDA events, L2 flushed, median of 30.
The committed table came from bench/results/sparq_sweep_h200.json.
"""

from __future__ import annotations

import dataclasses
import itertools

from kvcache.bench.decode import planned_call
from kvcache.bench.sweep import Sweep
from kvcache.kernels import sparq as ks
from kvcache.kernels.tuning import TUNING, Launch


def main() -> int:
    """Run the sweep and write its JSON."""
    sw = Sweep(__doc__.splitlines()[0])
    S, q, store, seqs = sw.context, sw.q, sw.store, sw.seqs
    csr, view = store.page_table(seqs, 0), store.layer_view(0)
    k = S // 16
    s1 = ks.sparq_stage1(q, view.k_dim, csr, 16)
    Hkv = sw.shape.num_kv_heads
    saved = dict(TUNING)
    # More programs at larger batches: each one's steps end in dependent atomics (the appends), so they run serially.
    programs = (264, 528, 1056) if sw.shape.batch == 1 else (528, 1056, 2112, 4224)
    for bn, nw, pr in itertools.product((256, 512, 1024, 2048), (1, 2, 4), programs):
        TUNING["topk"] = Launch(bn, nw, pr)
        sw.time("select.topk", {"bn": bn, "nw": nw, "pr": pr}, lambda: ks.sparq_select(s1, csr, Hkv, k, k // 4))
    TUNING.update(saved)
    for bn in (128, 256, 512, 1024):
        sw.time("select.scores", {"bn": bn}, lambda bn=bn: ks.sparq_select(s1, csr, Hkv, k, k // 4, block_n=bn))
    for r in (16, 32) if sw.shape.batch == 1 else ():
        name = "stage1" if r <= 16 else "stage1_wide"
        for bn, nw, pr in itertools.product((128, 256, 512), (2, 4), (264, 528)):
            TUNING[name] = Launch(bn, nw, pr)
            sw.time(name, {"r": r, "bn": bn, "nw": nw, "pr": pr}, lambda r=r: ks.sparq_stage1(q, view.k_dim, csr, r))
        TUNING.update(saved)
    for r, div in ((16, 16), (32, 8)):
        params = {"r": r, "k": S // div, "local_window": S // div // 4}
        call = planned_call(store, seqs, q, "sparq", params)
        sw.time("sparq", params, call)
        sw.profile_kernels("sparq.kernels_us", params, call)
    if sw.shape.batch > 1:  # stage 1's programs also set the scoring pass's splits: the whole step is the measure
        params = {"r": 16, "k": k, "local_window": k // 4}
        for pr in (528, 1056, 2112):
            TUNING["stage1"] = dataclasses.replace(saved["stage1"], programs=pr)
            sw.time("sparq.stage1_programs", {**params, "pr": pr}, planned_call(store, seqs, q, "sparq", params))
        TUNING.update(saved)
    # The scoring pass's warps, interleaved.
    step_params = {"r": 16, "k": k, "local_window": k // 4}
    for rnd, warps in itertools.product((0, 1), (2, 4, 8)):
        TUNING["scores"] = dataclasses.replace(saved["scores"], num_warps=warps)
        tag = {"round": rnd, "scores_warps": warps}
        sw.time("select.scores_warps", tag, lambda: ks.sparq_select(s1, csr, Hkv, k, k // 4))
        sw.time("sparq.scores_warps", {**step_params, **tag}, planned_call(store, seqs, q, "sparq", step_params))
    TUNING.update(saved)
    best = min((row for row in sw.report["rows"] if row["name"] == "select.topk"), key=lambda row: row["time_us"])
    p = best["params"]
    TUNING["topk"] = Launch(p["bn"], p["nw"], p["pr"])  # the whole step again at the selection's best launch
    for r, div in ((16, 16), (32, 8)):
        params = {"r": r, "k": S // div, "local_window": S // div // 4}
        call = planned_call(store, seqs, q, "sparq", params)
        sw.time("sparq.best_topk", {**params, **p}, call)
        sw.profile_kernels("sparq.best_topk.kernels_us", {**params, **p}, call)
    TUNING.update(saved)
    return sw.write()


if __name__ == "__main__":
    raise SystemExit(main())
