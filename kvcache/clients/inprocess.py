"""KVCacheClient: the one interface an engine uses, and its in-process implementation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from kvcache.methods.attend import attend as run_attention
from kvcache.methods.attend import run_validated, validate
from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.errors import InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.methods import AttentionResult
from kvcache.methods.gather import gather_key_dims, gather_rows
from kvcache.prefill.minference_index import BLOCK_SIZE, SparseIndex
from kvcache.prefill.serving import HeadPattern, SparsePrefillResult, served_index, served_prefill
from kvcache.stats import Totals
from kvcache.store import KVStore, SequenceInfo
from kvcache.methods.tiered import read_tiered_rows

FetchKind = Literal["columns", "rows", "value_mean", "summaries"]


@dataclass(frozen=True)
class FetchResult:
    """Tensors a fetch returns (see KVCacheClient.fetch) and the bytes it read from the store."""

    tensors: tuple[torch.Tensor, ...]
    bytes_read: int


@runtime_checkable
class KVCacheClient(Protocol):
    """What an engine calls, in-process or over gRPC; both raise the same kvcache.errors exceptions."""

    @property
    def config(self) -> KVCacheConfig:
        """The store's shape, dtype and capacities."""

    def create(self, token_ids: Sequence[int] | None = None) -> SequenceInfo:
        """New sequence; full pages of `token_ids` found in the prefix cache are reused."""

    def fork(self, seq_id: str) -> SequenceInfo:
        """New sequence sharing `seq_id`'s pages (copy-on-write)."""

    def free(self, seq_id: str) -> None:
        """Release a sequence."""

    def describe(self, seq_id: str) -> SequenceInfo:
        """Lengths and pages of a sequence."""

    def append(
        self,
        seq_id: str,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int | None = None,
        start: int | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> SequenceInfo:
        """Write K/V for new positions: [L, T, Hkv, d] for all layers or [T, Hkv, d] for one."""

    def attend(
        self,
        seq_ids: Sequence[str],
        layer: int,
        q: torch.Tensor,
        method: str = "dense",
        params: Mapping[str, Any] | None = None,
        new_k: torch.Tensor | None = None,
        new_v: torch.Tensor | None = None,
    ) -> AttentionResult:
        """Attention of q [B, Hq, d] at `layer`; new_k/new_v [B, Hkv, d], if given, are appended first."""

    def fetch(self, seq_id: str, layer: int, what: FetchKind, index: torch.Tensor | None = None) -> FetchResult:
        """Raw reads for engines that attend themselves (columns, rows, value_mean, summaries)."""

    def prefetch(self, seq_id: str, pages: Sequence[int] | None = None) -> SequenceInfo:
        """Bring pages (indexes into the sequence's page table; all if None) to the device ahead of use."""

    def stats(self) -> dict[str, Any]:
        """Pool usage (pages per tier), per-method calls, bytes read and seconds, bytes moved between tiers."""

    def sparse_index(
        self,
        seq_id: str,
        layer: int,
        q: torch.Tensor,
        start: int,
        patterns: HeadPattern | Sequence[HeadPattern],
        block_size: int = BLOCK_SIZE,
    ) -> SparseIndex:
        """MInference index of the prefill chunk q [T, Hq, d] at positions [start, start + T), from the keys held."""

    def sparse_prefill(
        self,
        seq_id: str,
        layer: int,
        q: torch.Tensor,
        start: int,
        patterns: HeadPattern | Sequence[HeadPattern],
        block_size: int = BLOCK_SIZE,
        backend: str = "auto",
    ) -> SparsePrefillResult:
        """Sparse prefill attention of the chunk q [T, Hq, d] at `start` (its K/V appended first): out, lse."""


class InProcessClient:
    """KVCacheClient over a KVStore in this process: the fast path."""

    def __init__(self, store_or_config: KVStore | KVCacheConfig) -> None:
        self.store = store_or_config if isinstance(store_or_config, KVStore) else KVStore(store_or_config)
        self.counters = Totals(("calls", "bytes_read", "seconds"))  # per attention method

    @property
    def config(self) -> KVCacheConfig:
        """The store's config."""
        return self.store.config

    def create(self, token_ids: Sequence[int] | None = None) -> SequenceInfo:
        """New sequence; full pages of `token_ids` found in the prefix cache are reused."""
        return self.store.create(token_ids)

    def fork(self, seq_id: str) -> SequenceInfo:
        """New sequence sharing `seq_id`'s pages (copy-on-write)."""
        return self.store.fork(seq_id)

    def free(self, seq_id: str) -> None:
        """Release a sequence."""
        self.store.free(seq_id)

    def describe(self, seq_id: str) -> SequenceInfo:
        """Lengths and pages of a sequence."""
        return self.store.describe(seq_id)

    def append(
        self,
        seq_id: str,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int | None = None,
        start: int | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> SequenceInfo:
        """Write K/V for new positions: [L, T, Hkv, d] for all layers or [T, Hkv, d] for one."""
        return self.store.append(seq_id, k, v, layer=layer, start=start, token_ids=token_ids)

    def attend(
        self,
        seq_ids: Sequence[str],
        layer: int,
        q: torch.Tensor,
        method: str = "dense",
        params: Mapping[str, Any] | None = None,
        new_k: torch.Tensor | None = None,
        new_v: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> AttentionResult:
        """Attention of q [B, Hq, d] at `layer`; new_k/new_v [B, Hkv, d], if given, are appended first.

        backend: "auto" (Triton on CUDA, torch reference elsewhere), "torch" or "triton".
        """
        if (new_k is None) != (new_v is None):
            raise InvalidParameter("new_k and new_v must be given together")
        if new_k is not None:
            c = self.config
            want = (len(seq_ids), c.num_kv_heads, c.head_dim)
            for name, t in (("new_k", new_k), ("new_v", new_v)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ShapeMismatch(f"{name} has shape {got}; expected [B, Hkv, d] = {want}")
            # Everything is checked before the new token is written, so a rejected call changes nothing.
            checked = validate(self.store, seq_ids, layer, q, method, params, backend, extra_positions=1)
            self.store.append_tokens(seq_ids, new_k, new_v, layer)
        t0 = time.perf_counter()
        if new_k is not None:  # already validated above: run without checking twice
            result = run_validated(self.store, seq_ids, layer, *checked, backend)
        else:
            result = run_attention(self.store, seq_ids, layer, q, method, params, backend)
        self.counters.add(method, calls=1, bytes_read=result.bytes_read, seconds=time.perf_counter() - t0)
        return result

    def fetch(self, seq_id: str, layer: int, what: FetchKind, index: torch.Tensor | None = None) -> FetchResult:
        """Raw reads for engines that attend themselves.

        columns:    index = key dims [Hkv, r]   -> keys [Hkv, r, S] (from k_dim)
        rows:       index = positions [Hkv, k]  -> keys, values [Hkv, k, d] (from k_seq, v_seq)
        value_mean: no index                    -> [Hkv, d] float32
        summaries:  no index                    -> [n_pages, Hkv, 3, d] float32 (min, max, mean)
        """
        store, c = self.store, self.config
        csr = store.page_table([seq_id], layer)
        S = csr.host_lens[0]  # no device sync
        view = store.layer_view(layer)
        if what in ("columns", "rows"):
            index = _check_index(index, c.num_kv_heads, c.head_dim if what == "columns" else S, what)
            index = index.to(c.device)
            if what == "columns":
                cols = gather_key_dims(view.k_dim, csr, 0, index)
                return FetchResult((cols,), cols.numel() * cols.element_size())
            if store.tiers is not None:  # rows from whichever tier holds them
                keys, values = read_tiered_rows(store, seq_id, layer, index)
            else:
                keys = gather_rows(view.k_seq, csr, 0, index)
                values = gather_rows(view.v_seq, csr, 0, index)
            return FetchResult((keys, values), 2 * keys.numel() * keys.element_size())
        if index is not None:
            raise InvalidParameter(f"fetch {what!r} takes no index")
        if what == "value_mean":
            mean = store.value_mean([seq_id], layer)[0]
            return FetchResult((mean,), mean.numel() * SUMMARY_DTYPE.itemsize)
        if what == "summaries":
            summary = view.k_summary[csr.pages_of(0)]
            return FetchResult((summary,), summary.numel() * SUMMARY_DTYPE.itemsize)
        raise InvalidParameter(f"unknown fetch kind {what!r}; expected columns, rows, value_mean or summaries")

    def prefetch(self, seq_id: str, pages: Sequence[int] | None = None) -> SequenceInfo:
        """Bring pages (indexes into the sequence's page table; all if None) to the device ahead of use."""
        return self.store.prefetch(seq_id, pages)

    def stats(self) -> dict[str, Any]:
        """Pool usage (pages per tier), per-method calls, bytes read and seconds, bytes moved between tiers."""
        return {"pool": self.store.pool_usage(), "methods": self.counters.snapshot(),
                "bytes_moved": self.store.bytes_moved()}

    def sparse_index(
        self,
        seq_id: str,
        layer: int,
        q: torch.Tensor,
        start: int,
        patterns: HeadPattern | Sequence[HeadPattern],
        block_size: int = BLOCK_SIZE,
    ) -> SparseIndex:
        """MInference index of the prefill chunk q [T, Hq, d] at positions [start, start + T), from the keys held.

        patterns: one HeadPattern for every head, or one per query head. q is in the store's dtype;
        the chunk's K/V must be appended at `layer` first (else PositionOutOfRange).
        """
        return served_index(self.store, seq_id, layer, q, start, patterns, block_size)

    def sparse_prefill(
        self,
        seq_id: str,
        layer: int,
        q: torch.Tensor,
        start: int,
        patterns: HeadPattern | Sequence[HeadPattern],
        block_size: int = BLOCK_SIZE,
        backend: str = "auto",
    ) -> SparsePrefillResult:
        """Sparse prefill attention of the chunk q [T, Hq, d] at `start` (its K/V appended first): out, lse.

        The index is built as sparse_index builds it; attention runs on it by the Triton kernel on
        CUDA, the torch reference elsewhere (backend "auto"), or as `backend` says.
        """
        t0 = time.perf_counter()
        result = served_prefill(self.store, seq_id, layer, q, start, patterns, block_size, backend)
        self.counters.add("minference", calls=1, bytes_read=result.bytes_read, seconds=time.perf_counter() - t0)
        return result


def _check_index(index: torch.Tensor | None, num_kv_heads: int, bound: int, what: str) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != num_kv_heads:
        got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ShapeMismatch(f"fetch {what!r} needs an index [Hkv={num_kv_heads}, n]; got {got}")
    if index.dtype not in (torch.int32, torch.int64):
        raise ShapeMismatch(f"fetch {what!r} index must be int32 or int64, got {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise PositionOutOfRange(f"fetch {what!r} index out of range [0, {bound})")
    return index.long()
