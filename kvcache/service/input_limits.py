"""What the server accepts of a request beyond the store's own checks: finite values, and work bounded by the store's
shape rather than by what a client sends."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter

# Query heads per kv head a call may bring: the largest GQA groups in use are 8 (Llama-2-70B, Llama-3-70B).
DEFAULT_MAX_GROUP = 16


@dataclass(frozen=True)
class InputLimits:
    """reject_nonfinite: NaN or Inf in q, k, v or a result is refused (INVALID_ARGUMENT); max_query_heads: the most
    query heads one attend may bring (None: DEFAULT_MAX_GROUP per kv head of the store)."""

    reject_nonfinite: bool = True
    max_query_heads: int | None = None

    def check_finite(self, t: torch.Tensor, name: str) -> None:
        """InvalidParameter if `t` (a decoded request tensor, on the CPU) holds NaN or Inf and that is refused."""
        if not (self.reject_nonfinite and t.is_floating_point() and t.numel()):
            return
        if not _finite(t):
            raise InvalidParameter(f"{name} holds NaN or Inf values: every later attend of the sequence would read "
                                   "them (the server refuses non-finite inputs)")

    def check_query_shape(self, shape: list[int], config: KVCacheConfig) -> None:
        """InvalidParameter if a q of `shape` [B, Hq, d] brings more query heads than a call may: the work of a call
        grows with them, and the store's shape, not the request, bounds it."""
        limit = self.max_query_heads or DEFAULT_MAX_GROUP * config.num_kv_heads
        if len(shape) == 3 and shape[1] > limit:
            raise InvalidParameter(f"q brings {shape[1]} query heads; this server takes at most {limit} "
                                   f"({limit // config.num_kv_heads} per kv head)")

    def check_result(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """InvalidParameter if an attention result is not finite (a scale that overflows the scores, say): a
        non-finite answer is never returned as OK."""
        if not all(_finite(t) for t in (out, lse)):
            raise InvalidParameter("the attention result is not finite (NaN or Inf): the scores overflowed; "
                                   "check scale and the values appended")


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite. A float32 sum is NaN or infinite whenever an element is, and 15 times
    cheaper than isfinite().all() on the CPU; only a sum that overflowed on finite values needs the exact check."""
    return math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())
