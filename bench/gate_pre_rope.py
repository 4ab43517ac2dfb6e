"""A page gate fed the model's q and keys rotated back to position 0 (pre-RoPE), as SeerAttention's AttnGate takes them
(q_nope, k_nope), against a gate fed the store's rotated q and page summaries: attention mass recall at 8K.

    python -m kvcache.bench.gate_pre_rope --json bench/results/gate_pre_rope_recall.json    # about 2 minutes on 2 cores

Why: a gate on rotated vectors sees absolute position in their low-frequency RoPE dimensions; trained on 4K windows
(positions 0..4095), it meets positions it never saw at 8K, where it lost to Quest (docs/methods.md, the gate's
figures). Rotated back, the inputs no longer depend on where the page sits, and the gate's own RoPE at page indexes
carries the distance (§3).

It loads both gates, trained alike (`kvcache train-gate --gate-dim 64`: 24 windows of 4096 after the text's first
8192, 512 queries each, 1200 steps; `--inputs rotated` for the other), then, on 8K windows of the text at four
starts (the first is the eval's own 8K, held out; the others overlap the training text), reports the attention
mass kept between the first and the query's page by the best 1/8 and 1/16 of the pages: each gate, Quest's bound
(on the rotated vectors, as served) and the oracle.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace

import torch

from kvcache.engine import train_gate as tg

PAGE = 16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/gate_pre_rope_recall.json")
    p.add_argument("--starts", default="0,24576,49152,73728", help="token starts of the 8K windows scored")
    p.add_argument("--gate", default="smollm2-135m", help="the pre-RoPE gate (kvcache train-gate --gate-dim 64)")
    p.add_argument("--rotated-gate", default="smollm2-135m-rotated",
                   help="the gate on rotated vectors to compare (kvcache train-gate --gate-dim 64 --inputs rotated)")
    args = p.parse_args()
    from kvcache.engine.eval_data import calibration_text
    from kvcache.engine.load import load_model
    from kvcache.methods.gate_store import load_gate

    t0 = time.perf_counter()
    model, tok = load_model(None)
    ids = tok.encode(calibration_text())
    gate, rotated_gate = load_gate(args.gate), load_gate(args.rotated_gate)
    if not gate.shape.pre_rope or rotated_gate.shape.pre_rope:
        raise SystemExit("--gate must be a pre-RoPE gate and --rotated-gate one on rotated vectors")
    base = gate.shape.model_rope_base
    rows = []
    for start in (int(s) for s in args.starts.split(",")):
        cap = tg.capture(model, ids[start : start + 8192], PAGE, 256, seed=100 + start, model_rope_base=base)
        as_stored = replace(cap, q=cap.rotated[0], pooled=cap.rotated[1], rotated=None)
        for f in (1 / 8, 1 / 16):
            row = {"start": start, "fraction_of_pages": f,
                   "rotated_gate": tg.mass_recall(tg.gate_scores(rotated_gate, as_stored), cap, f),
                   "pre_rope_gate": tg.mass_recall(tg.gate_scores(gate, cap), cap, f),
                   "quest": tg.mass_recall(tg.quest_scores(cap, model.config.head_dim), cap, f),
                   "oracle": tg.mass_recall(cap.gt, cap, f)}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    report = {"command": " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
              "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)", "page_size": PAGE, "gate_dim": 64,
              "gates": {"pre_rope": args.gate, "rotated": args.rotated_gate},
              "context": 8192, "mass_recall": rows, "seconds": round(time.perf_counter() - t0, 1)}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
