"""StreamingLLM's window (docs/sparse-attention.md §7): the first `sinks` positions (attention sinks) and the last
`window`
positions, attended to exactly. Reads 2*min(S, sinks + window)*d elements per kv head and chooses with no scoring:
the floor every sparse method must beat at equal bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_ROWS
from kvcache.methods.base import REQUIRED, AttentionMethod, Params, Selection, csr_rows, param
from kvcache.methods.coverage import reference_args
from kvcache.methods.dense import attend_rows
from kvcache.methods.gather import gather_rows
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult


def window_bytes(lens: Sequence[int], num_kv_heads: int, d: int, itemsize: int, sinks: int, window: int) -> int:
    """Per kv head: the K and V rows of the sinks and the window, 2*min(S, sinks + window)*d elements."""
    return sum(2 * min(S, sinks + window) * d * itemsize * num_kv_heads for S in lens)


def window_positions(lens: torch.Tensor, sinks: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [R, sinks + window] int32 of rows of lens [R] cached positions, and how many each reads [R] int32:
    0..sinks-1 then S-window..S-1, or 0..S-1 where the two meet."""
    t = sinks + window
    j = torch.arange(t, device=lens.device)[None, :]
    S = lens.long()[:, None]
    positions = torch.where((j < sinks) | (S <= t), j, S - t + j)
    return positions.to(torch.int32), S[:, 0].clamp(max=t).to(torch.int32)


def window_attention(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    window: int,
    sinks: int = 4,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over each sequence's first `sinks` and last `window` positions (torch
    reference)."""
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b, S in enumerate(csr.host_lens):
        kept = list(range(min(S, sinks))) + list(range(max(sinks, S - window), S))
        positions = torch.tensor(kept, device=q.device).expand(Hkv, len(kept))
        k, v = gather_rows(k_seq, csr, b, positions), gather_rows(v_seq, csr, b, positions)
        y, s = attend_rows(q[b].view(Hkv, Hq // Hkv, d), k, v, scale)
        out[b], lse[b] = y.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return AttentionResult(out, lse, window_bytes(csr.host_lens, Hkv, d, k_seq.element_size(), sinks, window))


@dataclass(frozen=True, kw_only=True)
class WindowParams(Params):
    """The window's parameters (docs/sparse-attention.md §7)."""

    window: int = param(REQUIRED, doc="most recent positions read per kv head", lo=0, cli=256)
    sinks: int = param(4, doc="first positions always read (attention sinks)", lo=0)


class Window(AttentionMethod):
    """Attention sinks plus a recent window, chosen without looking at q."""

    name = "window"
    Params = WindowParams
    doc = "StreamingLLM: the first `sinks` and the last `window` positions"

    def check(self, config: KVCacheConfig, lens: Sequence[int], p: WindowParams) -> None:
        if p.sinks + p.window < 1:
            raise InvalidParameter("window: sinks + window must be at least 1 (it would read nothing)")
        if p.min_coverage is not None:
            raise InvalidParameter("window: min_coverage cannot apply: the window has no estimate of the attention "
                                   "mass it leaves out (that needs every key read); use sparq, quest or gate")

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: WindowParams) -> int:
        return window_bytes(lens, config.num_kv_heads, config.head_dim, config.itemsize, p.sinks, p.window)

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: WindowParams) -> AttentionResult:
        view = inputs.view
        return window_attention(q, view.k_seq, view.v_seq, inputs.csr, **reference_args(p))

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: WindowParams) -> Selection:
        positions, count = window_positions(csr_rows(inputs.csr, inputs.num_kv_heads), p.sinks, p.window)
        return Selection(MODE_ROWS, positions, count)

    def shard(self, p: WindowParams, held: Sequence[int], totals: Sequence[int], starts: Sequence[int], is_last: bool,
              page_size: int) -> tuple[str, Params] | None:
        # A shard holds positions [start, start + held) of its row: of the sinks, those below p.sinks; of the window,
        # those from S - p.window on, which are the shard's last ones. Exact when the rows agree; else the most any
        # row needs (a superset: more bytes, and no longer the same positions as unsharded).
        sinks = max(min(h, max(0, p.sinks - a)) for h, a in zip(held, starts))
        window = max(min(h, max(0, a + h - max(a, t - p.window))) for h, t, a in zip(held, totals, starts))
        if window == 0 and sinks == 0 and not is_last:
            return None
        return self.name, replace(p, sinks=sinks, window=window)

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        window = int(context * share) - 4
        return WindowParams(window=window) if window >= 1 else None


WINDOW = Window()
