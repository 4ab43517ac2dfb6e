"""The gate's decode step with a gate on rotated vectors against a pre-RoPE gate (q rotated back in the query kernel):
the same store and query, the two gates attached in turn, 3 rounds; CUDA-graph replays, L2 flushed
(kvcache.bench.timing).

    python -m kvcache.bench.gate_rope_ab --json bench/results/gate_pre_rope_decode_ab_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvcache.bench.decode import LLAMA3_ROPE_BASE, Shape, _sdpa_call, build_store, planned_call
from kvcache.bench.timing import Timer, run_header
from kvcache.methods.attend import attend
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate

KINDS = {"rotated": 0.0, "pre_rope": LLAMA3_ROPE_BASE}


def compare(timer: Timer, batch: int, context: int, page: int, rounds: int = 3) -> dict:
    """Step times (us, median over rounds) of both kinds of gate at one shape, budget 4096, and their largest
    difference from the torch reference's output."""
    dev = torch.device("cuda")
    shape = Shape(batch, context, page_size=page)
    store, seqs = build_store(shape, dev)
    q = torch.randn((batch, shape.num_q_heads, shape.head_dim), device=dev).to(shape.dtype)
    row = {"batch": batch, "context": context, "page": page, "sdpa_us": timer.median_us(_sdpa_call(store, seqs, q,
                                                                                                 shape)[0])}
    gates = {kind: PageGate(GateShape(1, shape.num_kv_heads, shape.num_q_heads // shape.num_kv_heads, shape.head_dim,
                                      page, model_rope_base=base)) for kind, base in KINDS.items()}
    times: dict[str, list[float]] = {kind: [] for kind in gates}
    for r in range(rounds):
        for kind, gate in gates.items():
            attach_gate(store, gate)
            call = planned_call(store, seqs, q, "gate", {"budget": 4096})
            times[kind].append(timer.median_us(call))
            if r == 0:
                ref = attend(store, seqs, 0, q, "gate", {"budget": 4096}, backend="torch").out.float()
                row[f"{kind}_max_err"] = (call()[0].float() - ref).abs().max().item()
    for kind, ts in times.items():
        row[f"{kind}_us"], row[f"{kind}_all"] = statistics.median(ts), ts
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/gate_pre_rope_decode_ab.json")
    args = p.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, iters=30)
    rows = []
    for batch, context, page in ((1, 131072, 64), (1, 131072, 16), (8, 131072, 16), (1, 32768, 16)):
        rows.append(compare(timer, batch, context, page))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_all")}), flush=True)
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({**run_header(dev), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
