"""AttentionResult: what every attention method returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionResult:
    """out [B, Hq, d] in the query dtype; lse [B, Hq] float32 (natural log); bytes the method read;
    bytes moved between tiers for this call, per direction (e.g. {'device<-host': n}).

    coverage [B, Hq] float32 in [0, 1], on the query's device: the estimated share of each query head's attention
    mass the rows attended cover (docs/sparse-attention.md, "Coverage"); None where the method has no estimate
    (window). fallback [B] bool, on the host: set only when the call gave min_coverage, True for the sequences whose
    estimate fell below it and were attended densely instead.
    """

    out: torch.Tensor
    lse: torch.Tensor
    bytes_read: int
    bytes_moved: dict[str, int] = field(default_factory=dict)
    coverage: torch.Tensor | None = None
    fallback: torch.Tensor | None = None
