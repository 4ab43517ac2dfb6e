"""Launch sweep of the gate's kernels on a GPU: `python -m kvcache.bench.gate_sweep --json PATH`.

At 128K x 1 (32 q / 8 kv heads, d=128, bf16, page 16, random gate weights, budget 4096) it times,
with kernels/gate_score.py's launch constants replaced one at a time: the query GEMV, the scoring
pass, scoring + page selection, and the attention over the chosen pages; then the whole step's
per-kernel device times (torch profiler). CUDA graphs, CUDA events, L2 flushed, median of 30.
"""

from __future__ import annotations

import itertools

import torch

import kvcache.kernels.gate_score as gs
from kvcache.bench.decode import planned_call
from kvcache.bench.sweep import Sweep
from kvcache.kernels.paged_decode import MODE_PAGES, attend_partial_and_merge
from kvcache.kernels.tuning import Launch
from kvcache.methods.gate import gate_budget_pages
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate, layer_gate_of


def main() -> int:
    """Run the sweep and write its JSON."""
    sw = Sweep(__doc__.splitlines()[0])
    S, q, store, seqs, shape = sw.context, sw.q, sw.store, sw.seqs, sw.shape
    attach_gate(store, PageGate(GateShape(1, shape.num_kv_heads, shape.num_q_heads // shape.num_kv_heads,
                                          shape.head_dim, shape.page_size)))
    csr, view, lg = store.page_table(seqs, 0), store.layer_view(0), layer_gate_of(store, 0)
    P, budget = shape.page_size, 4096
    budget_pages, t = budget // P, gate_budget_pages(S, P, budget)
    step = planned_call(store, seqs, q, "gate", {"budget": budget})
    sw.time("gate", {"budget": budget}, step)
    for bo in (2, 4, 8, 16):
        gs.QUERY_BLOCK_O = bo
        sw.time("query", {"block_o": bo}, lambda: gs.gate_queries_triton(q, lg, csr))
    gs.QUERY_BLOCK_O = 4
    qg = gs.gate_queries_triton(q, lg, csr)
    saved = gs.SCORE_LAUNCH
    for bn, nw, pr in itertools.product((32, 64, 128), (2, 4), (528, 1056, 2112)):
        gs.SCORE_LAUNCH = Launch(bn, nw, pr)
        sw.time("score", {"bn": bn, "nw": nw, "pr": pr}, lambda: gs.gate_scores_triton(qg, lg.keys, csr, budget_pages))
    gs.SCORE_LAUNCH = saved

    def choose():
        _, sel, counts, ws = gs.gate_scores_triton(qg, lg.keys, csr, budget_pages)
        return gs.select_pages(sel, counts, ws, t)

    saved = gs.SELECT_LAUNCH
    for bn, nw, pr in itertools.product((512, 1024, 2048), (4, 8), (128, 256, 528)):
        gs.SELECT_LAUNCH = Launch(bn, nw, pr)
        sw.time("score+select", {"bn": bn, "nw": nw, "pr": pr}, choose)
    gs.SELECT_LAUNCH = saved
    chosen = choose()
    list_len = torch.full((shape.num_kv_heads,), t, dtype=torch.int32, device=q.device)
    for bn, nw, pr in itertools.product((32, 64, 128), (4, 8), (264, 528, 1056)):
        launch = Launch(bn, nw, pr)

        def attend(launch=launch):
            return attend_partial_and_merge(q, view.k_seq, view.v_seq, csr, t * P, MODE_PAGES, item_list=chosen,
                                            list_len=list_len, launch=launch)

        sw.time("attend", {"bn": bn, "nw": nw, "pr": pr}, attend)
    sw.profile_kernels("gate.kernels_us", {"budget": budget}, step)
    return sw.write()


if __name__ == "__main__":
    raise SystemExit(main())
