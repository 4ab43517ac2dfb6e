"""One decode step of a batch of sequences: every layer's attention is a KVCacheClient.attend call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.model import Llama
from kvcache.client import KVCacheClient


@dataclass(frozen=True)
class AttentionSpec:
    """A decode attention method of kvcache (dense, sparq, quest) and its parameters."""

    method: str = "dense"
    params: Mapping[str, Any] = field(default_factory=dict)

    def for_length(self, shortest: int) -> tuple[str, dict[str, Any]]:
        """Method and parameters for a step whose shortest sequence holds `shortest` positions (new token included).

        SparQ needs k <= S: while a sequence is shorter than k it would read every position
        anyway, so the step runs dense, which is exact and reads no more.
        """
        if self.method == "sparq" and shortest < self.params.get("k", 0):
            return "dense", {}
        return self.method, dict(self.params)


DENSE = AttentionSpec()


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

    Per layer one attend call appends the tokens' K/V and returns the attention output.
    """
    store_dtype = client.config.dtype
    method, params = spec.for_length(min(positions) + 1)
    bytes_read = 0

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        nonlocal bytes_read
        result = client.attend(seq_ids, layer, q[:, 0].to(store_dtype), method=method, params=params,
                               new_k=k[:, 0].to(store_dtype), new_v=v[:, 0].to(store_dtype))
        bytes_read += result.bytes_read
        return result.out[:, None].to(q.device, q.dtype)

    ids = torch.tensor([[int(t)] for t in token_ids], dtype=torch.long, device=model.device)
    pos = torch.tensor([[int(p)] for p in positions], dtype=torch.long, device=model.device)
    logits = model(ids, pos, attend)
    return StepResult(logits[:, 0], bytes_read)
