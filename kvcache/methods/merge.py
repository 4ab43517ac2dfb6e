"""Exact merge of partial attention results by their log-sum-exp (docs/sparse-attention.md §4)."""

from __future__ import annotations

import torch


def merge_lse(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge n partial results: outs [n, ..., d], lses [n, ...] -> out [..., d] (outs' dtype), lse [...] f32.

    docs/sparse-attention.md §4: s = log(sum_h exp(s_h)), A = sum_h exp(s_h - s) * A_h. A part with
    lse = -inf (it saw no positions) gets weight 0. Exact for dense parts; for SparQ parts it is
    approximate (each part chose its rows and reallocated its mean value on its own positions).
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse).nan_to_num(0.0)  # -inf - -inf when every part is empty
    # where(), not a product: an empty part's out may be NaN, and 0 * NaN is NaN.
    out = torch.where(weights[..., None] > 0, weights[..., None] * outs.float(), 0.0).sum(dim=0)
    return out.to(outs.dtype), lse
