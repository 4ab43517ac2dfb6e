"""The decode method and its parameters from `kvcache generate`'s flags (also read by the Star Attention CLI)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from kvcache.engine.decode import AttentionSpec, parse_layers


def attention_spec(args: argparse.Namespace, num_layers: int | None = None) -> AttentionSpec:
    """The decode method and its parameters from the flags (--dense-layers checked against `num_layers`)."""
    spec = _method_spec(args)
    try:
        dense = parse_layers(getattr(args, "dense_layers", ""), num_layers)
    except ValueError as exc:
        raise SystemExit(f"--dense-layers: {exc}") from None
    return replace(spec, layers=dict.fromkeys(dense, ("dense", {}))) if dense else spec


def _method_spec(args: argparse.Namespace) -> AttentionSpec:
    if args.method == "sparq":
        window = args.k // 4 if args.local_window is None else args.local_window
        return AttentionSpec("sparq", {"r": args.r, "k": args.k, "local_window": window})
    if args.method == "quest":
        return AttentionSpec("quest", {"top_pages": args.top_pages})
    if args.method == "gate":
        budget, threshold = gate_limits(args.budget, args.threshold)
        params = {"budget": budget, "threshold": threshold}
        return AttentionSpec("gate", {k: v for k, v in params.items() if v is not None})
    return AttentionSpec("dense", {})


def gate_limits(budget: int | None, threshold: float | None) -> tuple[int | None, float | None]:
    """A gate's (token budget, threshold) from flags: the budget defaults to 2048 tokens when neither is given."""
    return (2048 if budget is None and threshold is None else budget), threshold
