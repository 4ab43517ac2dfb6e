"""How SparQ's GQA group ranks positions (docs/sparse-attention.md §1, "GQA ranking"): one score per position from
the approximate logits of the group's query heads, the same on every path (torch reference, CPU, Triton)."""

from __future__ import annotations

import torch


def group_scores(x: torch.Tensor) -> torch.Tensor:
    """Scores [..., S] of a group's positions from its heads' approximate logits x [..., G, S]: log sum_g exp(x_g),
    the group's logits ranked as one softmax."""
    return torch.logsumexp(x, dim=-2)
