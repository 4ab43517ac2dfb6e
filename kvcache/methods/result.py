"""AttentionResult: what every attention method returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionResult:
    """out [B, Hq, d] in the query dtype; lse [B, Hq] float32 (natural log); bytes the method read."""

    out: torch.Tensor
    lse: torch.Tensor
    bytes_read: int
