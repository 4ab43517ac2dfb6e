"""`kvcache search-patterns`: the offline per-head pattern search of MInference (docs/sparse-attention.md §2).

One prefill pass of calibration text through the real model captures every layer's post-RoPE q
and k. Then, per layer and query head, each candidate pattern's index is built exactly as the
engine builds it at prefill time (one chunk of the whole calibration prompt), and scored by

  recall   the share of dense softmax mass its mask keeps, averaged over the queries of the
           prompt's second half (early queries see few keys: any pattern keeps nearly all of theirs);
  density  the share of the prompt's causal (query, key) pairs it computes (what the kernel pays).

Candidates over the density budget are out; of the rest the head takes the one of highest recall,
or among those within `tolerance` of it the sparsest. The choice is saved as a small JSON
(engine/patterns/<model>.json) that the engine loads by name.

`--kinds vertical_slash` searches among vertical-slash sizes only. On SmolLM2-135M the full search
gives most heads A-shape or block-sparse (on the calibration text they keep nearly as much mass
for less), and that loses passkey retrieval at 4K; vertical-slash everywhere keeps it
(engine/patterns/smollm2-135m-vs.json). Measured: bench/results/eval_minference_smollm2.json and
eval_minference_vs_smollm2.json.

Sizes: the authors' candidates (A-shape (100, 800), vertical-slash (30, 800), (100, 750), (500, 700),
(3500, 100), block-sparse top-8) are sizes for a prompt of REFERENCE_LENGTH tokens; at another
search length every size (and top-k) is scaled by length / REFERENCE_LENGTH, so a candidate keeps
the same share of the prompt. The saved sizes are in tokens (blocks for top-k), used as they are
at any prompt length, as the authors use theirs: longer prompts are then computed more sparsely.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch

from kvcache.prefill.minference_index import BLOCK_SIZE, MIN_COLUMNS, MIN_DIAGONALS
from kvcache.prefill.serving import PATTERNS, HeadPattern, build_index, paged

# The authors' search candidates (docs/sparse-attention.md §2) and the prompt length their sizes are taken to be for.
AUTHOR_CANDIDATES = (
    HeadPattern("a_shape", n_init=100, n_local=800),
    HeadPattern("vertical_slash", n_vertical=30, n_slash=800),
    HeadPattern("vertical_slash", n_vertical=100, n_slash=750),
    HeadPattern("vertical_slash", n_vertical=500, n_slash=700),
    HeadPattern("vertical_slash", n_vertical=3500, n_slash=100),
    HeadPattern("block_sparse", top_k=8),
)
REFERENCE_LENGTH = 4096
# Sizes the index builders raise smaller ones to anyway (top-k counts the first and the diagonal block).
LEAST = {"n_vertical": MIN_COLUMNS, "n_slash": MIN_DIAGONALS, "top_k": 2}
DEFAULT_LENGTH = 2048
DEFAULT_BUDGET = 0.65  # a head computes at most 65% of the causal pairs at the search length
DEFAULT_TOLERANCE = 0.01  # recalls this close count as equal: the sparser candidate wins


def scaled_candidates(length: int, candidates: Sequence[HeadPattern] = AUTHOR_CANDIDATES,
                      reference: int = REFERENCE_LENGTH) -> list[HeadPattern]:
    """The candidates with every size scaled by length / reference (no smaller than the builders take),
    no duplicates."""
    f = length / reference
    out = []
    for c in candidates:
        sized = HeadPattern(c.pattern, {name: max(LEAST.get(name, 1), round(value * f)) for name, value in c.sizes})
        if sized not in out:
            out.append(sized)
    return out


# ---- capturing q and k --------------------------------------------------------------------------------


@torch.inference_mode()
def capture_qk(model, token_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One causal forward pass over token_ids: each layer's post-RoPE (q [T, Hq, d], k [T, Hkv, d])."""
    from kvcache.engine.prefill import causal_attention

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        captured.append((q[0].clone(), k[0].clone()))
        return causal_attention(q[0], k[0], v[0])[None]

    n = len(token_ids)
    model(torch.tensor([list(token_ids)], dtype=torch.long), torch.arange(n)[None], attend, last_only=True)
    return captured


# ---- scoring ------------------------------------------------------------------------------------------


def score_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    candidates: Sequence[HeadPattern],
    *,
    block_size: int = BLOCK_SIZE,
    score_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall, density), each [Hq, len(candidates)], of every candidate for every head of one layer.

    q [T, Hq, d], k [T, Hkv, d] of one prompt from position 0. recall: mean over queries
    score_from.. (default T // 2) of the dense softmax mass inside the candidate's mask; density:
    pairs in the mask over the T (T + 1) / 2 causal pairs.
    """
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    score_from = T // 2 if score_from is None else score_from
    k_seq, _, csr = paged(k, k, block_size)  # values are not read by the builders
    indices = [build_index(q, k_seq, csr, 0, c, block_size=block_size) for c in candidates]
    keys = k.float().transpose(0, 1)  # [Hkv, T, d]
    rows = torch.arange(score_from, T)
    future = torch.arange(T)[None, :] > rows[:, None]
    causal = T * (T + 1) / 2
    recall = torch.empty((Hq, len(candidates)))
    density = torch.empty((Hq, len(candidates)))
    for h in range(Hq):
        logits = (q[score_from:, h].float() @ keys[h // G].T) / math.sqrt(d)
        probs = torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)  # [R, T]
        for c, index in enumerate(indices):
            mask = index.mask(h)  # [T, T]
            recall[h, c] = (probs * mask[score_from:]).sum(dim=-1).mean()
            density[h, c] = mask.sum() / causal
    return recall, density


def choose(recall: torch.Tensor, density: torch.Tensor, budget: float = DEFAULT_BUDGET,
           tolerance: float = DEFAULT_TOLERANCE) -> list[int]:
    """Per head (rows of [Hq, C]), the candidate to use: within the density budget (the sparsest one if none
    is), the highest recall, the sparsest among those within `tolerance` of it."""
    picks = []
    for r, dens in zip(recall.tolist(), density.tolist()):
        fits = [c for c in range(len(r)) if dens[c] <= budget]
        if not fits:
            picks.append(min(range(len(r)), key=lambda c: dens[c]))
            continue
        best = max(r[c] for c in fits)
        close = [c for c in fits if r[c] >= best - tolerance]
        picks.append(min(close, key=lambda c: (dens[c], -r[c])))
    return picks


def search_patterns(
    model,
    token_ids: Sequence[int],
    *,
    name: str = "model",
    candidates: Sequence[HeadPattern] | None = None,
    budget: float = DEFAULT_BUDGET,
    tolerance: float = DEFAULT_TOLERANCE,
    block_size: int = BLOCK_SIZE,
    score_from: int | None = None,
    reference_length: int = REFERENCE_LENGTH,
    progress: Callable[[int, int], None] | None = None,
):
    """Each layer's per-head patterns for `model`, searched on one calibration prompt (token ids) -> PatternConfig.

    candidates: default the authors', scaled to the prompt's length by length / reference_length.
    """
    from kvcache.engine.patterns import PatternConfig

    c = model.config
    T = len(token_ids)
    candidates = scaled_candidates(T, reference=reference_length) if candidates is None else list(candidates)
    t0 = time.perf_counter()
    captured = capture_qk(model, token_ids)
    capture_seconds = time.perf_counter() - t0
    layers, scores = [], []
    for layer, (q, k) in enumerate(captured):
        recall, density = score_layer(q, k, candidates, block_size=block_size, score_from=score_from)
        picks = choose(recall, density, budget, tolerance)
        layers.append([candidates[p] for p in picks])
        scores.append([{"recall": float(recall[h, p]), "density": float(density[h, p])} for h, p in enumerate(picks)])
        if progress is not None:
            progress(layer + 1, len(captured))
    search = {
        "length": T, "block_size": block_size, "budget": budget, "tolerance": tolerance,
        "score": f"dense softmax mass kept, mean over queries {T // 2 if score_from is None else score_from}..{T - 1}",
        "density": "computed (query, key) pairs / causal pairs of the search prompt",
        "reference_length": reference_length,
        "candidates": [p.label for p in candidates],
        "capture_seconds": round(capture_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
    }
    return PatternConfig(name, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, layers, scores, search)


# ---- the command --------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache search-patterns`."""
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--name", help="model name saved in the JSON (default: smollm2-135m, or the model file's stem)")
    p.add_argument("--length", type=int, default=DEFAULT_LENGTH, help=f"calibration tokens (default {DEFAULT_LENGTH})")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"largest share of causal pairs a pattern may compute at the search length "
                        f"(default {DEFAULT_BUDGET})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"recalls this close are equal and the sparser wins (default {DEFAULT_TOLERANCE})")
    p.add_argument("--kinds", default=",".join(k for k in PATTERNS if k != "causal"),
                   help="comma-separated pattern kinds to search among (default a_shape,vertical_slash,block_sparse)")
    p.add_argument("--reference-length", type=int, default=REFERENCE_LENGTH,
                   help=f"the prompt length the authors' candidate sizes are for: they are scaled by "
                        f"length / this (default {REFERENCE_LENGTH})")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE, help=f"index block size (default {BLOCK_SIZE})")
    p.add_argument("--out", help="where to write the JSON (default engine/patterns/<name>.json)")


def calibration_ids(tok, length: int) -> list[int]:
    """`length` tokens of the calibration text's second half (the Python docs' topic pages; `kvcache eval` scores
    another text, and the second half keeps the saved patterns reproducible from when it read this one)."""
    from kvcache.engine.eval_data import calibration_text

    text = calibration_text()
    half = text[len(text) // 2 :]
    chars = 8 * length
    while True:
        ids = tok.encode(half[:chars])
        if len(ids) >= length or chars >= len(half):
            break
        chars *= 2
    if len(ids) < length:
        raise ValueError(f"the calibration text holds only {len(ids)} tokens; asked for {length}")
    return ids[:length]


def main(args: argparse.Namespace) -> int:
    """Run `kvcache search-patterns`: search, print the choice per pattern, write the JSON."""
    import pathlib

    from kvcache.engine.load import load_model
    from kvcache.engine.patterns import DEFAULT_NAME, PATTERNS_DIR

    name = args.name or (DEFAULT_NAME if args.model is None else pathlib.Path(args.model).stem.lower())
    out = args.out or str(PATTERNS_DIR / f"{name}.json")
    model, tok = load_model(args.model)
    ids = calibration_ids(tok, args.length)
    kinds = set(filter(None, args.kinds.split(",")))
    unknown = kinds - set(PATTERNS)
    if unknown or not kinds:
        raise SystemExit(f"kvcache search-patterns: --kinds {args.kinds!r}; expected some of {sorted(PATTERNS)}")
    candidates = [p for p in scaled_candidates(len(ids), reference=args.reference_length) if p.pattern in kinds]
    print(f"searching {model.config.num_layers} layers x {model.config.num_heads} heads on {len(ids)} tokens; "
          f"candidates {[p.label for p in candidates]}", file=sys.stderr, flush=True)

    def progress(done: int, total: int) -> None:
        print(f"\rlayer {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    config = search_patterns(model, ids, name=name, candidates=candidates, budget=args.budget,
                             tolerance=args.tolerance, block_size=args.block_size,
                             reference_length=args.reference_length, progress=progress)
    config.search["text"] = "pydoc_data.topics (kvcache.engine.eval_data.calibration_text), second half"
    config.save(out)
    flat = [(p.label, s) for row, srow in zip(config.layers, config.scores) for p, s in zip(row, srow)]
    print(f"{'pattern':<32} {'heads':>5} {'recall':>8} {'density':>8}")
    for label, count in config.counts().items():
        chosen = [s for lb, s in flat if lb == label]
        print(f"{label:<32} {count:>5} {sum(s['recall'] for s in chosen) / count:8.4f} "
              f"{sum(s['density'] for s in chosen) / count:8.4f}")
    print(f"mean recall {sum(s['recall'] for _, s in flat) / len(flat):.4f}, mean density "
          f"{sum(s['density'] for _, s in flat) / len(flat):.4f}; {config.search['seconds']} s; wrote {out}")
    return 0
