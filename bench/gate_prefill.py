"""Gate prefill on the GPU: the gate's block index (torch) and the block-sparse kernel against SDPA's causal attention,
one layer of Llama-3-8B's attention shape (32 q / 8 kv heads, d=128, bf16), the whole prompt as one chunk, random
q/k/v and gate weights; CUDA events, median of 10.

    python -m kvcache.bench.gate_prefill --json bench/results/gate_prefill_h200.json
"""

from __future__ import annotations

import argparse
import json

import torch

from kvcache.bench.timing import Timer, run_header
from kvcache.engine.prefill import causal_attention
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.prefill.gate_prefill import gate_block_index
from kvcache.prefill.serving import index_pairs, paged, sparse_attention

HQ, HKV, D = 32, 8, 128


def time_one(timer: Timer, context: int, block: int, budget: int) -> dict:
    """Times (us) of SDPA, the gate's index and the kernel on it, at one context, block size and token budget."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn((context, h, D), device=dev, generator=g, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    k_seq, v_seq, csr = paged(k, v, block)
    layer_gate = PageGate(GateShape(1, HKV, HQ // HKV, D, block, 128)).layer(0).to(dev)
    sdpa = timer.median_us(lambda: causal_attention(q, k, v))
    index_us = timer.median_us(lambda: gate_block_index(q, k_seq, csr, 0, layer_gate, budget=budget))
    index = gate_block_index(q, k_seq, csr, 0, layer_gate, budget=budget)
    kernel = timer.median_us(lambda: sparse_attention(q, k_seq, v_seq, csr, index, backend="triton"))
    pairs, causal = index_pairs(index)
    return {"context": context, "block": block, "budget": budget, "sdpa_us": sdpa, "gate_index_us": index_us,
            "sparse_kernel_us": kernel, "density": pairs / causal, "speedup_kernel": sdpa / kernel,
            "speedup_total": sdpa / (index_us + kernel)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/gate_prefill.json")
    args = p.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, iters=10, warmup=2, use_graphs=False)
    rows = []
    for context in (16384, 32768):
        for block, budget in ((64, 2048), (64, 4096)):
            rows.append(time_one(timer, context, block, budget))
            print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in rows[-1].items()}), flush=True)
    with open(args.json, "w") as f:
        json.dump({**run_header(dev), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
