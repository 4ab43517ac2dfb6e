"""A Llama-architecture decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameter names are those of Hugging Face's LlamaForCausalLM, so a safetensors checkpoint loads
as it is. The model holds no KV cache: each layer's attention is a function the caller passes
(exact causal attention during prefill, a KVCacheClient.attend call during decode).

On the CPU every op is plain torch. On a GPU a decode step is a few hundred kernels too small for their
bytes, so their count is its cost (docs/engine.md): after `fuse_projections` the Q/K/V and the
gate/up projections are one matmul each, and the residual add with the next RMSNorm, the rotation of
q and k, and SiLU(gate) * up are one Triton kernel each (kvcache.kernels.rms_norm, .rope, .swiglu).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvcache.engine.config import ModelConfig
from kvcache.kernels.rms_norm import add_rms_norm
from kvcache.kernels.rope import rope_qk
from kvcache.kernels.swiglu import silu_mul

# (layer, q [B, T, Hq, d], k [B, T, Hkv, d], v [B, T, Hkv, d]) -> attention output [B, T, Hq, d];
# q and k are already rotated, so whatever stores k stores it post-RoPE.
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels run the ops around attention for activations x (on a GPU)."""
    return x.is_cuda


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


def _fused(parts: list[nn.Linear], fused: torch.Tensor | None) -> torch.Tensor | None:
    """`fused` if the parts' weights are still its row blocks (a later .to() gives each its own storage)."""
    if fused is None or parts[0].weight.data_ptr() != fused.data_ptr() or parts[0].weight.device != fused.device:
        return None
    return fused


def _fuse(parts: list[nn.Linear]) -> torch.Tensor:
    """One weight of the parts' rows, stacked; each part's weight becomes a view of its block, so the state dict,
    its names and the memory stay as they were."""
    with torch.no_grad():
        fused = torch.cat([p.weight.detach() for p in parts])
        _as_blocks(parts, fused)
    return fused


def _as_blocks(parts: list[nn.Linear], fused: torch.Tensor) -> None:
    """Make each part's weight the view of its row block of `fused`."""
    at = 0
    for p in parts:
        n = p.weight.shape[0]
        p.weight.data = fused[at : at + n]
        at += n


def _install(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.data = weight


def _install_fused(owner: nn.Module, attr: str, parts: list[nn.Linear], fused: torch.Tensor) -> None:
    setattr(owner, attr, fused)
    _as_blocks(parts, fused)


def _is_column_major(weight: torch.Tensor) -> bool:
    return weight.stride(0) == 1 and weight.shape[0] > 1


def _column_major_faster(weight: torch.Tensor, trials: int) -> bool:
    """Whether one row times a weight of this shape is faster column-major than row-major: the median of `trials`
    rounds of products of each over up to 64 MiB of copies, so that large weights stream from memory as in a step."""
    out_features, in_features = weight.shape
    copies = min(64, max(1, (64 << 20) // max(1, weight.numel() * weight.element_size())))
    rows = weight.detach().expand(copies, out_features, in_features).contiguous()
    x = torch.ones((1, 1, in_features), dtype=weight.dtype)
    seconds = {}
    for column_major in (False, True):
        ws = [w.t().contiguous().t() if column_major else w for w in rows]
        times = []
        for _ in range(trials + 1):  # the first round warms up
            t0 = time.perf_counter()
            for w in ws:
                F.linear(x, w)
            times.append(time.perf_counter() - t0)
        seconds[column_major] = statistics.median(times[1:])
    return seconds[True] < seconds[False]


class Attention(nn.Module):
    """Q/K/V/O projections; the attention itself is the caller's AttentionFn."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.qkv: torch.Tensor | None = None  # [q; k; v] rows, set by fuse_projections

    def forward(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttentionFn) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.c
        qkv = _fused([self.q_proj, self.k_proj, self.v_proj], self.qkv)
        if qkv is None:
            q = self.q_proj(x).view(B, T, c.num_heads, c.head_dim)
            k = self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
            v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        else:
            q, k, v = F.linear(x, qkv).split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                              c.num_kv_heads * c.head_dim], dim=-1)
            q = q.view(B, T, c.num_heads, c.head_dim)
            k = k.view(B, T, c.num_kv_heads, c.head_dim)
            v = v.view(B, T, c.num_kv_heads, c.head_dim)
        if use_kernels(x):
            q, k = rope_qk(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(layer, q, k, v)  # [B, T, Hq, d]
        return self.o_proj(out.reshape(B, T, c.num_heads * c.head_dim).to(x.dtype))

    def fuse_projections(self) -> None:
        """Make the Q/K/V projections one matmul (their weights become views of one tensor)."""
        self.qkv = _fuse([self.q_proj, self.k_proj, self.v_proj])


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None  # [gate; up] rows, set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = _fused([self.gate_proj, self.up_proj], self.gate_up)
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = F.linear(x, gate_up)
        if use_kernels(x):
            return self.down_proj(silu_mul(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """Make the gate and up projections one matmul (their weights become views of one tensor)."""
        self.gate_up = _fuse([self.gate_proj, self.up_proj])


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

    def forward_fused(self, layer: int, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                      sin: torch.Tensor, attend: AttentionFn) -> tuple[torch.Tensor, torch.Tensor]:
        """forward on a GPU with the residual adds folded into the norms: takes and returns the block output h and
        the residual stream before h is added (None before the first layer: h is then the embedding)."""
        norm = self.input_layernorm
        x, residual = add_rms_norm(h, residual, norm.weight, norm.eps)
        h = self.self_attn(layer, x, cos, sin, attend)
        norm = self.post_attention_layernorm
        x, residual = add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(x), residual


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
        self.cpu_layouts_chosen = False  # set by choose_cpu_layouts

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
        if not use_kernels(x):
            for i, layer in enumerate(self.model.layers):
                x = layer(i, x, cos, sin, attend)
            return x
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer.forward_fused(i, x, residual, cos, sin, attend)
        return x + residual

    @property
    def projections_fused(self) -> bool:
        """Whether every layer's Q/K/V and gate/up projections run as one matmul each (fuse_projections)."""
        return all(_fused([a.q_proj, a.k_proj, a.v_proj], a.qkv) is not None
                   and _fused([m.gate_proj, m.up_proj], m.gate_up) is not None
                   for a, m in ((layer.self_attn, layer.mlp) for layer in self.model.layers))

    def fuse_projections(self) -> Llama:
        """Q/K/V and gate/up as one matmul each, in every layer: fewer, larger kernels per step. Call it after the
        weights are loaded and moved (a later .to() undoes it, harmlessly); the state dict is unchanged."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    def for_decoding(self) -> Llama:
        """Ready for decode steps on its device: projections fused (fuse_projections), and on the CPU every matmul
        weight stored in the memory order its one-row products read fastest (measured once per shape:
        choose_cpu_layouts). Values, names and the state dict are unchanged."""
        if not self.projections_fused:
            self.fuse_projections()
        if self.device.type == "cpu" and not self.cpu_layouts_chosen:
            self.choose_cpu_layouts()
        return self

    @torch.no_grad()  # not inference_mode: the weights it installs must stay usable by autograd
    def choose_cpu_layouts(self, trials: int = 5) -> Llama:
        """Store each matmul weight row-major or column-major, whichever gives the faster product with one row.

        A decode step multiplies one row per sequence by every weight, reading each once from memory. On the CPU
        (MKL), a weight with many more outputs than inputs reads about twice as fast column-major: the output matrix
        and the fused gate/up took half the time on the 2-core machine, the down projection a fifth more, so the
        order is measured per shape rather than assumed (docs/engine.md, "Decode on the CPU")."""
        faster: dict[tuple[int, int], bool] = {}
        for weight, install in self._matmul_weights():
            shape = tuple(weight.shape)
            if shape not in faster:
                faster[shape] = _column_major_faster(weight, trials)
            if faster[shape] != _is_column_major(weight):
                install(weight.t().contiguous().t() if faster[shape] else weight.contiguous())
        self.cpu_layouts_chosen = True
        return self

    def _matmul_weights(self) -> list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]]:
        """(weight, install) of every matmul weight a decode step reads, where install(w) puts w, of the same
        values, in its place; a fused weight stands for its parts, which become views of the new one."""
        found: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            for owner, attr, parts in ((a, "qkv", [a.q_proj, a.k_proj, a.v_proj]),
                                       (m, "gate_up", [m.gate_proj, m.up_proj])):
                fused = _fused(parts, getattr(owner, attr))
                if fused is None:
                    found += [(p.weight, functools.partial(_install, p)) for p in parts]
                else:
                    found.append((fused, functools.partial(_install_fused, owner, attr, parts)))
            found += [(p.weight, functools.partial(_install, p)) for p in (a.o_proj, m.down_proj)]
        out = self.lm_head if self.lm_head is not None else self.model.embed_tokens
        return found + [(out.weight, functools.partial(_install, out))]

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
