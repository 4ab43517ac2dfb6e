"""Which transformers models the KV store can serve, and whether a store fits a model (docs/transformers.md, "What is
refused")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcache.config import KVCacheConfig
from kvcache.errors import ShapeMismatch

# Model types whose attention is the Llama family's: q, k, v projections (a q/k norm at most), RoPE on q and k, the
# cache's update, then softmax(q k^T * scaling) v over every cached position. Nothing else enters the scores.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Layer types (config.layer_types) that hold no per-position K/V, or attend over a window of them.
_RECURRENT_LAYERS = {"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "recurrent"}
_WINDOW_LAYERS = {"sliding_attention", "chunked_attention"}


class UnsupportedModel(ValueError):
    """A transformers model whose attention the KV store cannot serve; the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """What the store must match and the decode step needs, from a model's config."""

    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def refusal(config: Any) -> str | None:
    """Why the store cannot serve a model of `config` (a transformers PreTrainedConfig), or None if it can."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        return (f"{model_type} is an encoder-decoder model: its decoder attends to the encoder's output through "
                f"cross-attention, which is not a cache of its own tokens a decoder store can hold")
    text = _text_config(config)
    for name in ("kv_lora_rank", "q_lora_rank"):
        if getattr(text, name, None):
            return (f"{model_type} uses multi-head latent attention ({name}={getattr(text, name)}): it caches one "
                    f"compressed latent per position, not the per-head keys and values the store holds")
    layer_types = list(getattr(text, "layer_types", None) or [])
    recurrent = sorted(set(layer_types) & _RECURRENT_LAYERS)
    if recurrent or any(getattr(text, name, None) for name in ("ssm_state_size", "state_size", "linear_num_key_heads")):
        what = f"layers of type {', '.join(recurrent)}" if recurrent else "state-space layers"
        return (f"{model_type} has linear-attention or recurrent {what}: they keep a running state, not per-position "
                f"keys and values to attend over")
    window = _window(text, layer_types)
    if window is not None:
        return (f"{model_type} uses sliding-window attention ({window}): each query sees only the last positions, "
                f"while the store keeps and attends over every position, so past the window the answers would differ")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {model_type!r} is outside the Llama family this integration serves "
                f"({', '.join(SUPPORTED_MODEL_TYPES)}): its attention may add what the store's methods do not compute "
                f"(logit softcapping, attention sinks, ALiBi or other position biases)")
    return None


def _window(text: Any, layer_types: list[str]) -> str | None:
    """A description of the sliding or chunked window the model attends within, or None if it attends over all."""
    windowed = sorted(set(layer_types) & _WINDOW_LAYERS)
    if windowed:
        return f"layers of type {', '.join(windowed)}, window {getattr(text, 'sliding_window', None)}"
    if layer_types:  # every layer named full attention: a sliding_window value is unused (Qwen2's use_sliding_window)
        return None
    size = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    if not size or getattr(text, "use_sliding_window", True) is False:
        return None
    context = getattr(text, "max_position_embeddings", None)
    if context is not None and size >= context:  # a window as long as the context never cuts anything
        return None
    return f"sliding_window={size}" + ("" if context is None else f" < max_position_embeddings={context}")


def check_supported(config: Any) -> ModelShape:
    """The shape of a model the store can serve; UnsupportedModel naming why otherwise."""
    why = refusal(config)
    if why is not None:
        raise UnsupportedModel(why)
    text = _text_config(config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads, head_dim)


def check_store(store: KVCacheConfig, shape: ModelShape) -> None:
    """ShapeMismatch unless the store holds the model's layers, kv heads and head dim."""
    have = (store.num_layers, store.num_kv_heads, store.head_dim)
    want = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    if have != want:
        raise ShapeMismatch(f"the store holds (layers, kv heads, head dim) = {have}; the model needs {want}")
