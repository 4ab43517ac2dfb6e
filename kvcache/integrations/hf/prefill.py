"""Prefill attention of one batch row: its new tokens over its earlier positions (read back from the store) and
themselves, causally, computed here by SDPA (docs/transformers.md, "Prefill")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcache.clients.inprocess import KVCacheClient


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last T of S positions, q [Hq, T, d], over k, v [Hkv, S, d]: query i sees keys up to S - T + i;
    returns [Hq, T, d]."""
    T, S = q.shape[1], k.shape[1]
    groups = q.shape[0] // k.shape[0]
    gqa = {}
    if q.device.type == "cpu":
        gqa = {"enable_gqa": groups > 1}  # the CPU kernels read kv head h // G themselves
    elif groups > 1:
        # The fused CUDA kernels take no GQA: query head h reads kv head h // G (transformers' repeat_kv order).
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    # Imported here: the module pulls in torch._dynamo (a second of start-up).
    from torch.nn.attention.bias import causal_lower_right

    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=causal_lower_right(T, S), scale=scale,
                                         **gqa)
    return out[0]


def read_prefix(client: KVCacheClient, seq_id: str, layer: int, length: int, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [Hkv, length, d] of a sequence's first `length` positions at `layer`, in `like`'s dtype and device."""
    rows = torch.arange(length).expand(client.config.num_kv_heads, length)
    keys, values = client.fetch(seq_id, layer, "rows", rows).tensors
    return keys.to(like.device, like.dtype), values.to(like.device, like.dtype)
