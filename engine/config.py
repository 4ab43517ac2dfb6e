"""ModelConfig: the hyperparameters of a Llama-architecture decoder."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcache.engine.errors import UnsupportedModel

# Prompt positions per prefill chunk: larger chunks read the prompt's K/V fewer times (an 8K CPU prefill's attention
# took 18 s in chunks of 256 and 13 s in chunks of 1024: docs/engine.md); MInference and the gate score whole chunks.
PREFILL_CHUNK = 1024


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama decoder: sizes in elements, rope_theta the RoPE base, rms_norm_eps RMSNorm's epsilon."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UnsupportedModel(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModel(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """The config of a Hugging Face LlamaConfig dict (config.json)."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        if hf.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
            raise UnsupportedModel(f"config.json describes model_type {hf.get('model_type')!r}; "
                                   "only llama is supported")
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise UnsupportedModel(f"rope_scaling {scaling} is not implemented")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise UnsupportedModel("attention or MLP biases are not implemented")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
