"""One decode step of a batch of sequences: every layer's attention is a KVCacheClient.attend call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcache.clients.inprocess import KVCacheClient
from kvcache.config import KVCacheConfig
from kvcache.engine.model import Llama
from kvcache.methods import lookup
from kvcache.methods.byte_budget import BYTES, least_share


@dataclass(frozen=True)
class AttentionSpec:
    """A decode attention method of kvcache (dense, sparq, quest, gate, oracle), its parameters, and the layers that
    run another."""

    method: str = "dense"
    params: Mapping[str, Any] = field(default_factory=dict)
    # Layers that run another method instead, {layer: (method, params)}: e.g. the few layers where a page gate's
    # choice was measured to cost the most perplexity read every page.
    layers: Mapping[int, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)

    def for_length(self, shortest: int, config: KVCacheConfig | None = None) -> tuple[str, dict[str, Any]]:
        """Method and parameters for a step whose shortest sequence holds `shortest` positions (new token included)
        in a store of `config`.

        Each method's own rule (AttentionMethod.fit): SparQ, for one, runs dense while a sequence is shorter than k.
        A byte budget runs dense while the method has no parameters that read so little at that length.
        """
        method = lookup(self.method)
        share = self.params.get(BYTES)
        if share is not None:
            if config is None:
                raise ValueError("a byte budget's step needs the store's config to know what the method can read")
            floor = least_share(method, shortest, config.page_size, config.head_dim, config.itemsize)
            return (self.method, dict(self.params)) if floor <= share else ("dense", {})
        name, params = method.fit(method.parse(self.params), shortest)
        return name, params.like(self.params)

    def at_layer(self, layer: int, method: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The method and parameters of `layer`: its own from `layers` if it has them, else (method, params)."""
        if layer in self.layers:
            own_method, own_params = self.layers[layer]
            return own_method, dict(own_params)
        return method, params


DENSE = AttentionSpec()


def parse_layers(text: str, num_layers: int | None) -> list[int]:
    """Layer ids from a list like "7" or "4-7,12", each within [0, num_layers); ValueError if malformed."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        lo, hi = int(first), int(last) if dash else int(first)
        if num_layers is None or not 0 <= lo <= hi < num_layers:
            raise ValueError(f"layers {part!r} are not within the model's {num_layers} layers")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


@dataclass
class StepResult:
    """Logits after a decode step and the attention bytes the store read for it (all layers, all sequences)."""

    logits: torch.Tensor  # [B, vocab] float32
    bytes_read: int


def decode_step(
    model: Llama,
    client: KVCacheClient,
    seq_ids: Sequence[str],
    token_ids: Sequence[int],
    positions: Sequence[int],
    spec: AttentionSpec = DENSE,
) -> StepResult:
    """Feed token_ids[b] at positions[b] to sequence seq_ids[b] (which holds exactly positions[b] entries).

    The step is checked and planned once (client.begin_step: methods, pages, page table, where the new rows go);
    per layer one call appends the tokens' K/V and returns the attention output.
    """
    store_dtype = client.config.dtype
    method, params = spec.for_length(min(positions) + 1, client.config)
    step = client.begin_step(seq_ids, model.config.num_heads, method, params,
                             layer_methods={layer: (m, dict(p)) for layer, (m, p) in spec.layers.items()})
    bytes_read = 0

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        nonlocal bytes_read
        result = step.attend(layer, q[:, 0].to(store_dtype), k[:, 0].to(store_dtype), v[:, 0].to(store_dtype))
        bytes_read += result.bytes_read
        return result.out[:, None].to(q.device, q.dtype)

    ids = torch.tensor([[int(t)] for t in token_ids], dtype=torch.long, device=model.device)
    pos = torch.tensor([[int(p)] for p in positions], dtype=torch.long, device=model.device)
    logits = model(ids, pos, attend)
    return StepResult(logits[:, 0], bytes_read)
