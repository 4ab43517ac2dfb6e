"""Coverage: the estimated share of a query head's attention mass that the rows a method attended cover
(docs/sparse-attention.md, "Coverage"), and the per-sequence figure min_coverage and the stats use.

Dense covers everything (1). SparQ's estimate is its alpha (§1 step 5). A page method's is the softmax mass of the
pages it chose under the distribution its own page scores define over every page of the sequence (Quest: its
bounds; the gate: its logits; the oracle: the exact attention). The window has none: knowing what it leaves out
means reading every key.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcache.kernels.paged_decode import MODE_DENSE
from kvcache.methods.base import Params, Selection


def chosen_mass(logits: torch.Tensor, chosen: torch.Tensor, count: torch.Tensor | None = None,
                n_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax mass of the chosen columns, a share in [0, 1]: logits [R, G, M] (columns of row r past n_cols[r], if
    given, are not part of the softmax), chosen [R, t] distinct column indexes of which the first count[r] count
    (all without count) -> [R, G] float32."""
    x = logits.float()
    if n_cols is not None:
        past = torch.arange(x.shape[2], device=x.device)[None, :] >= n_cols.to(x.device)[:, None]
        x = x.masked_fill(past[:, None, :], float("-inf"))
    return chosen_share(torch.softmax(x, dim=-1), chosen, count)


def chosen_share(probs: torch.Tensor, chosen: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of probs [R, G, M] over the chosen columns [R, t] (the first count[r] of row r; all without count) ->
    [R, G] float32."""
    R, G, M = probs.shape
    t = chosen.shape[1]
    # Padding entries may hold anything (the GPU selections leave them unwritten): clamped, then not counted.
    index = chosen.to(probs.device, torch.long).clamp(0, M - 1)[:, None, :].expand(R, G, t)
    picked = torch.gather(probs.float(), 2, index)
    if count is not None:
        live = torch.arange(t, device=probs.device)[None, :] < count.to(probs.device)[:, None]
        picked = torch.where(live[:, None, :], picked, 0.0)
    return picked.sum(-1)


def selection_coverage(sel: Selection, alpha: torch.Tensor | None, batch: int, q_heads: int,
                       device: torch.device) -> torch.Tensor | None:
    """The call's coverage [B, Hq] float32, clipped to [0, 1], from what the method selected and the alpha [B*Hkv, G]
    its attention summed (SparQ); None if the selection has no estimate."""
    if sel.mode == MODE_DENSE:
        return torch.ones((batch, q_heads), dtype=torch.float32, device=device)
    if sel.estimate is not None:
        mass = sel.estimate()
    elif alpha is not None:
        mass = alpha
    else:
        return None
    # Row b*Hkv + h, column g is query head h*G + g of sequence b. Rounding can take a full sum a hair past 1.
    return mass.float().reshape(batch, q_heads).clamp(0.0, 1.0)


def merged_coverage(lses: torch.Tensor, coverages: torch.Tensor) -> torch.Tensor:
    """Coverage [B, Hq] of parts merged by lse (shards), from each part's lse and coverage [n, B, Hq]: part i's whole
    mass is estimated as exp(lse_i) / coverage_i, so the merge covers sum_i exp(lse_i) / sum_i exp(lse_i) /
    coverage_i. A part that attended nothing (lse -inf) weighs nothing."""
    weights = torch.softmax(lses.float(), dim=0)  # exp(lse_i) / sum_j exp(lse_j)
    return (1.0 / (weights / coverages.float().clamp_min(1e-12)).sum(0)).clamp(0.0, 1.0)


def full_coverage(q: torch.Tensor) -> torch.Tensor:
    """Coverage [B, Hq] of a method that attends every position of q's sequences: all 1."""
    return torch.ones(q.shape[:2], dtype=torch.float32, device=q.device)


def sequence_coverage(coverage: torch.Tensor) -> torch.Tensor:
    """Each sequence's estimate [B] from coverage [B, Hq]: its least covered query head's (one badly covered head is
    enough to spoil the layer's output)."""
    return coverage.amin(dim=1)


def reference_args(p: Params) -> dict[str, Any]:
    """p's fields as a method's reference function takes them: all but min_coverage, which attend applies around
    the method (kvcache.methods.attend)."""
    args = p.as_dict()
    args.pop("min_coverage", None)
    return args
