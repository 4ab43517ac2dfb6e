"""kvcache: a memory-bandwidth-aware paged KV cache manager for long-context decoding."""

import pathlib as _pathlib

# kvcache.kernels, kvcache.engine and kvcache.bench are the repository's kernels/, engine/ and bench/ folders:
# installed, pyproject.toml's package-dir puts them under kvcache; run from a source checkout that is not installed,
# the checkout's root joins this package's path so the same names import.
_CHECKOUT = _pathlib.Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "kernels" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

from kvcache.clients.inprocess import InProcessClient, KVCacheClient
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
    "RemoteClient",
    "ShardedClient",
]


def __getattr__(name: str):
    # The gRPC clients load grpcio: only when asked for.
    if name == "RemoteClient":
        from kvcache.clients.remote import RemoteClient

        return RemoteClient
    if name == "ShardedClient":
        from kvcache.clients.sharded import ShardedClient

        return ShardedClient
    raise AttributeError(f"module 'kvcache' has no attribute {name!r}")
