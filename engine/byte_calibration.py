"""`kvcache calibrate-bytes`: measure, per layer, how much attention mass the best fraction of positions covers,
on the calibration text, and save it as the model's byte allocation (kvcache.methods.byte_allocation).

Each window of the calibration text runs once through the model with exact attention. In every layer, for the
last `queries` positions, the probabilities of the group's query heads are averaged (the paper's GQA rule,
docs/sparse-attention.md §1) and sorted; the curve at a fraction f is the mass of the top ceil(f * n) of the n
positions that query sees, averaged over queries, kv heads and windows. The evaluation text is never read here.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kvcache.engine.model import Llama
from kvcache.engine.prefill import causal_attention
from kvcache.methods.byte_allocation import ByteAllocation, save_allocation

GRID = tuple(i / 128 for i in range(1, 129))  # fractions of the positions a query sees


def layer_curves(model: Llama, windows: list[list[int]], queries: int, grid: tuple[float, ...] = GRID
                 ) -> list[list[float]]:
    """Coverage [layer][i]: mean attention mass of the top grid[i] of positions, over the windows' last `queries`
    query positions and the kv heads."""
    c = model.config
    G = c.num_heads // c.num_kv_heads
    sums = torch.zeros((c.num_layers, len(grid)), dtype=torch.float64)
    fractions = torch.tensor(grid, dtype=torch.float64)
    counts = [0] * c.num_layers

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[1]
        t = min(queries, T)
        qs = q[0, T - t :].float().transpose(0, 1)  # [Hq, t, d]
        ks = k[0].float().transpose(0, 1).repeat_interleave(G, dim=0)  # [Hq, T, d]
        scores = qs @ ks.transpose(1, 2) / math.sqrt(c.head_dim)
        seen = torch.arange(T)[None, :] <= torch.arange(T - t, T)[:, None]  # [t, T] causal
        probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
        group = probs.view(c.num_kv_heads, G, t, T).mean(1)  # [Hkv, t, T]
        cum = group.sort(dim=-1, descending=True).values.cumsum(-1)
        n = seen.sum(-1)  # [t] positions each query sees
        at = (torch.ceil(fractions[None, :] * n[:, None]).long() - 1).clamp(0, T - 1)  # [t, F]
        sums[layer] += cum.gather(-1, at.expand(c.num_kv_heads, t, len(grid))).sum((0, 1)).double()
        counts[layer] += c.num_kv_heads * t
        return torch.stack([causal_attention(q[b], k[b], v[b]) for b in range(q.shape[0])])

    for ids in windows:
        model(torch.tensor([ids]), torch.arange(len(ids))[None], attend, last_only=True)
    return [[float(x) / counts[layer] for x in sums[layer]] for layer in range(c.num_layers)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache calibrate-bytes`."""
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--name", default="smollm2-135m",
                   help="allocation name: writes kvcache/methods/allocations/NAME.json (or a path ending in .json)")
    p.add_argument("--contexts", default="2048,4096", help="window lengths in tokens, comma-separated")
    p.add_argument("--windows", type=int, default=4, help="windows per context, consecutive in the calibration text")
    p.add_argument("--queries", type=int, default=64, help="last query positions of each window measured")


def main(args: argparse.Namespace) -> int:
    """Measure the curves on the calibration text, average them over contexts, save the allocation."""
    from kvcache.engine.eval_data import CALIBRATION_SOURCE, calibration_text
    from kvcache.engine.load import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    ids = tok.encode(calibration_text())
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    per_context = []
    for C in contexts:
        windows = [ids[j * C : (j + 1) * C] for j in range(args.windows)]
        if len(windows[-1]) < C:
            raise SystemExit(f"{args.windows} windows of {C} tokens pass the end of the calibration text")
        per_context.append(layer_curves(model, windows, args.queries))
        print(f"context {C}: {args.windows} windows measured ({time.perf_counter() - t0:.0f} s)", flush=True)
    curves = [[sum(cc[layer][i] for cc in per_context) / len(per_context) for i in range(len(GRID))]
              for layer in range(model.config.num_layers)]
    c = model.config
    allocation = ByteAllocation(GRID, tuple(tuple(row) for row in curves), c.num_kv_heads, c.head_dim,
                                model=args.model or "smollm2-135m",
                                calibration=f"{CALIBRATION_SOURCE}: contexts {contexts}, {args.windows} windows "
                                            f"each, last {args.queries} queries")
    path = save_allocation(allocation, args.name)
    for share in (1 / 16, 1 / 8, 1 / 4):
        shares = allocation.shares(share)
        print(f"bytes={share:.4g}: per-layer shares " + " ".join(f"{s:.3f}" for s in shares))
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0
