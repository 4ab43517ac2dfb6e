"""A transcription-level Llama forward on GGUF tensors, for checking the engine (no cache, no batching).

Written the way llama.cpp computes a LLAMA graph, not the way engine/model.py does: it reads the
tensors under their GGUF names and in the GGUF row order, rotates adjacent pairs (2i, 2i+1) as
GGML's rope does, and loops over heads with an explicit causal mask. When its logits equal the
model's, the model, the loader's renaming and its undoing of llama.cpp's q/k row order are right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from kvcache.engine.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * weight / sqrt(mean(x^2) + eps) over the last dimension."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope_adjacent_pairs(x: torch.Tensor, base: float) -> torch.Tensor:
    """GGML's normal rope of x [T, H, d]: pair (2i, 2i+1) at position p turns by p * base^(-2i/d)."""
    T, _, d = x.shape
    out = x.clone()
    for p in range(T):
        for i in range(d // 2):
            theta = p * base ** (-2 * i / d)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[p, :, 2 * i], x[p, :, 2 * i + 1]
            out[p, :, 2 * i] = a * c - b * s
            out[p, :, 2 * i + 1] = a * s + b * c
    return out


def reference_logits(tensors: Mapping[str, torch.Tensor], c: ModelConfig, ids: Sequence[int],
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [T, vocab] of every position of `ids`, from GGUF-named, GGUF-ordered tensors, computed in `dtype`."""
    def w(name: str) -> torch.Tensor:
        return tensors[name].to(dtype)

    T, d, G = len(ids), c.head_dim, c.num_heads // c.num_kv_heads
    x = w("token_embd.weight")[list(ids)]  # [T, hidden]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in range(c.num_layers):
        p = f"blk.{layer}."
        h = rms_norm(x, w(p + "attn_norm.weight"), c.rms_norm_eps)
        q = rope_adjacent_pairs((h @ w(p + "attn_q.weight").T).view(T, c.num_heads, d), c.rope_theta)
        k = rope_adjacent_pairs((h @ w(p + "attn_k.weight").T).view(T, c.num_kv_heads, d), c.rope_theta)
        v = (h @ w(p + "attn_v.weight").T).view(T, c.num_kv_heads, d)
        heads = []
        for head in range(c.num_heads):
            kv = head // G  # llama.cpp's broadcast: query heads [kv*G, (kv+1)*G) share kv head kv
            scores = (q[:, head] @ k[:, kv].T) / math.sqrt(d)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        x = x + torch.cat(heads, dim=-1) @ w(p + "attn_output.weight").T
        h = rms_norm(x, w(p + "ffn_norm.weight"), c.rms_norm_eps)
        gate = h @ w(p + "ffn_gate.weight").T
        x = x + ((gate * torch.sigmoid(gate)) * (h @ w(p + "ffn_up.weight").T)) @ w(p + "ffn_down.weight").T
    x = rms_norm(x, w("output_norm.weight"), c.rms_norm_eps)
    out = tensors.get("output.weight", tensors["token_embd.weight"])
    return x @ out.to(dtype).T
