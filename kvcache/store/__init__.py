"""The store: page pool, allocator, page tables, tiers and eviction; what attention methods read."""

from kvcache.store.kv_store import KVStore, LayerView, SequenceInfo

__all__ = ["KVStore", "LayerView", "SequenceInfo"]
