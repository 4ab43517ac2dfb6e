"""Hugging Face transformers models decoding through a kvcache store (docs/transformers.md).

    from kvcache import InProcessClient, KVCacheConfig
    from kvcache.integrations.transformers import KVCacheCache, use_kvcache

    use_kvcache(model)  # a Llama-family model: its attention implementation becomes "kvcache"
    client = InProcessClient(KVCacheConfig(num_layers=..., num_kv_heads=..., head_dim=..., dtype="float32"))
    with KVCacheCache(client, method="sparq", share=1 / 8) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    print(cache.totals.attention_bytes_per_token)

Needs the `transformers` extra (pip install 'kvcache[transformers]').
"""

from __future__ import annotations

from kvcache.integrations.hf.attention import ATTENTION_NAME, kvcache_attention, register, use_kvcache
from kvcache.integrations.hf.cache import CacheTotals, KVCacheCache
from kvcache.integrations.hf.checks import SUPPORTED_MODEL_TYPES, UnsupportedModel, check_supported, refusal

__all__ = [
    "ATTENTION_NAME",
    "CacheTotals",
    "KVCacheCache",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModel",
    "check_supported",
    "kvcache_attention",
    "refusal",
    "register",
    "use_kvcache",
]
