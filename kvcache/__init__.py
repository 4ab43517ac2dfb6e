"""kvcache: a memory-bandwidth-aware paged KV cache manager for long-context decoding."""

from kvcache.client import InProcessClient, KVCacheClient
from kvcache.config import KVCacheConfig
from kvcache.errors import (
    DTypeMismatch,
    InvalidParameter,
    KVCacheError,
    PositionOutOfRange,
    SequenceNotFound,
    ShapeMismatch,
    StoreFull,
)
from kvcache.methods.result import AttentionResult
from kvcache.store import KVStore, SequenceInfo

__all__ = [
    "AttentionResult",
    "DTypeMismatch",
    "InProcessClient",
    "InvalidParameter",
    "KVCacheClient",
    "KVCacheConfig",
    "KVCacheError",
    "KVStore",
    "PositionOutOfRange",
    "SequenceInfo",
    "SequenceNotFound",
    "ShapeMismatch",
    "StoreFull",
]
