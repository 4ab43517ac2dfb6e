"""The "kvcache" attention implementation of transformers: a model prepared by `use_kvcache` attends through the
KVCacheCache its forward was given, and like "sdpa" with any other cache or none (docs/transformers.md)."""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

import torch

from kvcache.integrations.hf.cache import KVCacheCache
from kvcache.integrations.hf.checks import check_supported
from kvcache.integrations.hf.imports import load_transformers

_masking = load_transformers("masking_utils")
_sdpa = load_transformers("integrations.sdpa_attention")

ATTENTION_NAME = "kvcache"
_LOCAL = threading.local()  # .stack: the KVCacheCache (or None) of each forward running in this thread, innermost last


def _stack() -> list[KVCacheCache | None]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def active_cache() -> KVCacheCache | None:
    """The KVCacheCache of the innermost forward of a prepared model running in this thread, if it was given one."""
    stack = _stack()
    return stack[-1] if stack else None


def kvcache_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, T, d], key, value [B, Hkv, T, d] as the cache's update
    returned them; the output [B, T, Hq, d] comes from the store's KVCacheCache, or from SDPA without one."""
    cache = active_cache()
    if cache is None:
        return _sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, key, value, scaling), None


def kvcache_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask transformers builds for "kvcache": none with a KVCacheCache (it has each row's 2-D padding mask from
    the forward's start), SDPA's otherwise."""
    if active_cache() is not None:
        return None
    return _masking.sdpa_mask(*args, **kwargs)


@functools.cache
def register() -> None:
    """Register "kvcache" with transformers' attention and attention-mask interfaces (once)."""
    load_transformers("modeling_utils").AttentionInterface.register(ATTENTION_NAME, kvcache_attention)
    _masking.AttentionMaskInterface.register(ATTENTION_NAME, kvcache_mask)


@functools.cache
def _forward_parameters(cls: type) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.forward).parameters)


def _call_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's arguments by name, positional ones included."""
    names = [n for n in _forward_parameters(type(module)) if n != "self"]
    return {**dict(zip(names, args)), **kwargs}


def _before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    stack = _stack()
    stack.append(None)  # popped by _after_forward whatever happens next
    call = _call_arguments(module, args, kwargs)
    cache = call.get("cache", call.get("past_key_values"))
    if isinstance(cache, KVCacheCache):
        cache.begin_forward(module.config, call.get("input_ids"), call.get("attention_mask"),
                            call.get("inputs_embeds"))
        stack[-1] = cache


def _after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = _stack().pop()
    if cache is not None:
        cache.end_forward()


def use_kvcache(model: torch.nn.Module) -> torch.nn.Module:
    """Prepare a transformers model to decode through a KVCacheCache passed as its cache: checks it is a model the store
    can serve (UnsupportedModel says why not), sets its attention implementation to "kvcache" and hooks its decoder's
    forward; returns the model."""
    check_supported(model.config)
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    decoder = getattr(model, "base_model", model)
    if not getattr(decoder, "_kvcache_hooked", False):
        decoder.register_forward_pre_hook(_before_forward, with_kwargs=True)
        decoder.register_forward_hook(_after_forward, with_kwargs=True, always_call=True)
        decoder._kvcache_hooked = True
    return model
