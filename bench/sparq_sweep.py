"""Launch sweep of SparQ's kernels on a GPU: `python -m kvcache.bench.sparq_sweep --json PATH`.

At 128K x 1 (32 q / 8 kv heads, d=128, bf16, page 16) it times, with kernels/tuning.py's entries
replaced one at a time: the selection (scoring pass + radix top-k) over topk launches and scoring
block sizes, and stage 1 over its launches at r=16 and r=32; then the whole SparQ step with the
per-kernel device times (torch profiler). CUDA graphs, CUDA events, L2 flushed, median of 30.
The committed table came from bench/results/sparq_sweep_h200.json.
"""

from __future__ import annotations

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
    saved = dict(TUNING)
    for bn, nw, pr in itertools.product((256, 512, 1024, 2048), (1, 2, 4), (264, 528, 1056)):
        TUNING["topk"] = Launch(bn, nw, pr)
        sw.time("select.topk", {"bn": bn, "nw": nw, "pr": pr}, lambda: ks.sparq_select(s1, csr, 8, k, k // 4))
    TUNING.update(saved)
    for bn in (128, 256, 512, 1024):
        sw.time("select.scores", {"bn": bn}, lambda bn=bn: ks.sparq_select(s1, csr, 8, k, k // 4, block_n=bn))
    for r in (16, 32):
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
    return sw.write()


if __name__ == "__main__":
    raise SystemExit(main())
