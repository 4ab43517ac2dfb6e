"""A Llama-architecture decoder in plain torch: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameter names are those of Hugging Face's LlamaForCausalLM, so a safetensors checkpoint loads
as it is. The model holds no KV cache: each layer's attention is a function the caller passes
(exact causal attention during prefill, a KVCacheClient.attend call during decode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.engine.config import ModelConfig

# (layer, q [B, T, Hq, d], k [B, T, Hkv, d], v [B, T, Hkv, d]) -> attention output [B, T, Hq, d];
# q and k are already rotated, so whatever stores k stores it post-RoPE.
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin [B, T, 1, d] for integer positions [B, T]: frequency i = base^(-2i/d), repeated for both halves."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [B, T, d/2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, d] in Hugging Face's half-split layout: pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Q/K/V/O projections; the attention itself is the caller's AttentionFn."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttentionFn) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.c
        q = apply_rope(self.q_proj(x).view(B, T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        out = attend(layer, q, k, v)  # [B, T, Hq, d]
        return self.o_proj(out.reshape(B, T, c.num_heads * c.head_dim).to(x.dtype))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks, each with a residual connection."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttentionFn) -> torch.Tensor:
        x = x + self.self_attn(layer, self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(nn.Module):
    """Llama-architecture causal LM; `forward` runs positions through every layer with a given attention."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        # Tied models have no lm_head parameter (as in HF checkpoints): logits use the embedding matrix.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] matrix that turns final hidden states into logits."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (and of the hidden states)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights: token ids and positions are made there."""
        return self.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of token ids [B, T] at positions [B, T]; [B, 1, vocab] if last_only."""
        x = self.hidden_states(ids, positions, attend)
        return self.logits(x[:, -1:] if last_only else x)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """The residual stream [B, T, hidden] after the last layer (before the final norm), in the weights' dtype."""
        c = self.config
        x = self.model.embed_tokens(ids)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(i, x, cos, sin, attend)
        return x

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of final hidden states x [B, T, hidden], computed in the weights' dtype."""
        return F.linear(self.model.norm(x.to(self.dtype)), self.output_weight).float()


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Llama:
    """A Llama with random weights for tests: linear weights N(0, 1/fan_in), embeddings N(0, 1), norms near 1.

    Scaled so activations stay of order one and attention is far from uniform: a wrong rotation or
    head mapping changes the logits visibly. Drawn on `device` (the same seed gives other values there).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device))
    return model.to(dtype).eval()
