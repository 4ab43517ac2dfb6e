"""AttentionResult: what every attention method returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionResult:
    """out [B, Hq, d] in the query dtype; lse [B, Hq] float32 (natural log); bytes the method read;
    bytes moved between tiers for this call, per direction (e.g. {'device<-host': n})."""

    out: torch.Tensor
    lse: torch.Tensor
    bytes_read: int
    bytes_moved: dict[str, int] = field(default_factory=dict)
