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

    def check_finite(self, t: torch.Tensor, name: str, data: bytes | None = None) -> None:
        """InvalidParameter if `t` (a decoded request tensor, on the CPU) holds NaN or Inf and that is refused; `data`,
        its bytes as they came, lets most tensors be cleared without a torch call."""
        if not self.reject_nonfinite or (data is not None and surely_finite(data, t.dtype)):
            return
        if not (t.is_floating_point() and t.numel()):
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

    def check_result(self, out: torch.Tensor, lse: torch.Tensor, data: tuple[bytes, bytes] | None = None) -> None:
        """InvalidParameter if an attention result is not finite (a scale that overflows the scores, say): a
        non-finite answer is never returned as OK. `data`: out's and lse's bytes as they leave, if at hand."""
        if data is not None and all(surely_finite(d, t.dtype) for d, t in zip(data, (out, lse))):
            return
        if not all(_finite(t) for t in (out, lse)):
            raise InvalidParameter("the attention result is not finite (NaN or Inf): the scores overflowed; "
                                   "check scale and the values appended")


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite. A float32 sum is NaN or infinite whenever an element is, and 15 times
    cheaper than isfinite().all() on the CPU; only a sum that overflowed on finite values needs the exact check."""
    return math.isfinite(float(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


# For each float dtype: bytes per element, the index of the byte holding the top of the exponent (little-endian),
# and the bits of that byte which are all ones in every NaN and Inf. They are all ones in no value of magnitude
# below 2**16 (float16: only in NaN and Inf) or 2**127 (float32, bfloat16).
_EXPONENT_TOP = {torch.float16: (2, 1, 0x7C), torch.bfloat16: (2, 1, 0x7F), torch.float32: (4, 3, 0x7F)}
_CLEAR = {mask: bytes(b for b in range(256) if b & mask != mask) for mask in {m for _, _, m in _EXPONENT_TOP.values()}}


def surely_finite(data: bytes, dtype: torch.dtype) -> bool:
    """True if `data`, a tensor of `dtype` as little-endian bytes, surely holds no NaN or Inf; False: cannot tell.

    It reads each element's top exponent byte alone, so a huge value or an unknown dtype cannot be told apart. Two
    passes over the bytes in C, against the two torch calls of a float32 sum: cheaper by an order of magnitude on a
    layer call's few kilobytes, whose torch calls run with cold caches between attends."""
    layout = _EXPONENT_TOP.get(dtype)
    if layout is None:
        return False
    size, top, mask = layout
    return not data[top::size].translate(None, _CLEAR[mask])
