"""KVCacheClient: the one interface an engine uses, and its in-process implementation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.errors import InvalidParameter, KVCacheError, PositionOutOfRange, ShapeMismatch
from kvcache.methods import AttentionResult
from kvcache.methods.attend import check_new_rows, run_validated, validate
from kvcache.methods.byte_budget import BYTES
from kvcache.methods.coverage import sequence_coverage
from kvcache.methods.decode_step import DecodeStep
from kvcache.methods.dense import DENSE
from kvcache.methods.gather import gather_key_dims
from kvcache.methods.registry import METHODS
from kvcache.prefill.minference_index import BLOCK_SIZE, SparseIndex
from kvcache.prefill.serving import HeadPattern, SparsePrefillResult, served_index, served_prefill
from kvcache.stats import CoverageTotals, Totals
from kvcache.store import KVStore, SequenceInfo
from kvcache.store.step_plan import StepPlan

FetchKind = Literal["columns", "rows", "value_mean", "summaries"]


@dataclass(frozen=True)
class AttendCall:
    """One attend call's arguments (KVCacheClient.attend), for InProcessClient.attend_many."""

    seq_ids: Sequence[str]
    layer: int
    q: torch.Tensor
    method: str = "dense"
    params: Mapping[str, Any] | None = None
    new_k: torch.Tensor | None = None
    new_v: torch.Tensor | None = None
    backend: str = "auto"
    plan: StepPlan | None = None  # calls of a planned step run alone


@dataclass(frozen=True)
class FetchResult:
    """Tensors a fetch returns (see KVCacheClient.fetch) and the bytes it read from the store."""

    tensors: tuple[torch.Tensor, ...]
    bytes_read: int


class StepCalls(Protocol):
    """A decode step begun with begin_step: one call per layer."""

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor) -> AttentionResult:
        """Append new_k, new_v [B, Hkv, d] at `layer` and attend q [B, Hq, d] over each sequence."""


class PlannedCalls:
    """begin_step for a client that has plan_step and attend(plan=): each layer's call is an attend with the step's
    plan (a remote or sharded client; the in-process client runs a kvcache.methods.decode_step.DecodeStep)."""

    def __init__(self, client: KVCacheClient, seq_ids: Sequence[str], method: str, params: Mapping[str, Any] | None,
                 backend: str, layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None) -> None:
        self.client = client
        self.seq_ids = list(seq_ids)
        self.choice = (method, params)
        self.layer_methods = dict(layer_methods or {})
        self.backend = backend
        self.plan = client.plan_step(seq_ids)

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor) -> AttentionResult:
        """One layer's attend call with the step's plan."""
        method, params = self.layer_methods.get(layer, self.choice)
        return self.client.attend(self.seq_ids, layer, q, method, params, new_k=new_k, new_v=new_v,
                                  backend=self.backend, plan=self.plan)


class _CountedStep:
    """A DecodeStep whose calls count in the in-process client's per-method totals and coverage stats."""

    def __init__(self, step: DecodeStep, client: InProcessClient) -> None:
        self.step = step
        self.client = client

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor) -> AttentionResult:
        t0 = time.perf_counter()
        result = self.step.attend(layer, q, new_k, new_v)
        method = self.step.method_name(layer)
        self.client.counters.add(method, calls=1, bytes_read=result.bytes_read, seconds=time.perf_counter() - t0)
        self.client.count_host_coverage(method, layer, result)
        return result


@runtime_checkable
class KVCacheClient(Protocol):
    """What an engine calls, in-process or over gRPC; both raise the same kvcache.errors exceptions."""

    @property
    def config(self) -> KVCacheConfig:
        """The store's shape, dtype and capacities."""

    def create(self, token_ids: Sequence[int] | None = None, lease_seconds: float | None = None) -> SequenceInfo:
        """New sequence; full pages of `token_ids` found in the prefix cache are reused; with a lease, freed once
        no call names it for `lease_seconds`."""

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
        backend: str = "auto",
        plan: StepPlan | None = None,
    ) -> AttentionResult:
        """Attention of q [B, Hq, d] at `layer`; new_k/new_v [B, Hkv, d], if given, are appended first; with a
        step's plan, its page table (built once for the step) is used."""

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1) -> StepPlan:
        """Plan a decode step of `seq_ids` that appends `new_tokens` (0 or 1) per layer call: a handle for attend."""

    def begin_step(self, seq_ids: Sequence[str], q_heads: int, method: str = "dense",
                   params: Mapping[str, Any] | None = None, backend: str = "auto",
                   layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None = None) -> StepCalls:
        """A decode step checked and planned once: its attend(layer, q, new_k, new_v) appends one row per sequence
        and attends at each layer (the method of `layer_methods` where that names the layer)."""

    def fetch(self, seq_id: str, layer: int, what: FetchKind, index: torch.Tensor | None = None) -> FetchResult:
        """Raw reads for engines that attend themselves (columns, rows, value_mean, summaries)."""

    def prefetch(self, seq_id: str, pages: Sequence[int] | None = None) -> SequenceInfo:
        """Bring pages (indexes into the sequence's page table; all if None) to the device ahead of use."""

    def stats(self) -> dict[str, Any]:
        """Pool usage (pages per tier), per-method calls, bytes read and seconds, bytes moved between tiers, and per
        method and layer the coverage estimates and dense fallbacks (kvcache.stats.CoverageTotals)."""

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
        self.coverage = CoverageTotals()  # per attention method and layer

    @property
    def config(self) -> KVCacheConfig:
        """The store's config."""
        return self.store.config

    def create(self, token_ids: Sequence[int] | None = None, lease_seconds: float | None = None) -> SequenceInfo:
        """New sequence; full pages of `token_ids` found in the prefix cache are reused. With a lease, the sequence
        is freed by expire_leases() once no call has named it for `lease_seconds`."""
        return self.store.create(token_ids, lease_seconds)

    def verify(self) -> dict[str, Any]:
        """Check every page on the host and disk tiers against its checksums: pages_checked, corrupted_pages
        (quarantined: never served), sequences (those holding them)."""
        return self.store.verify()

    def expire_leases(self) -> list[str]:
        """Free the sequences whose lease has run out; their ids (`kvcache serve` calls this every 0.25 s)."""
        return [sid for sid in self.store.expired() if self.store.free_if_expired(sid)]

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
        plan: StepPlan | None = None,
    ) -> AttentionResult:
        """Attention of q [B, Hq, d] at `layer`; new_k/new_v [B, Hkv, d], if given, are appended first.

        backend: "auto" (Triton on CUDA, the torch path elsewhere), "torch" or "triton". plan: the step's
        plan_step(), whose page table every layer's call reuses (PlanStale if it no longer holds).
        """
        check_new_rows(self.config, len(seq_ids), new_k, new_v)
        # Everything is checked before the new token is written, so a rejected call changes nothing.
        m, q, p = validate(self.store, seq_ids, layer, q, method, params, backend,
                           extra_positions=0 if new_k is None else 1, plan=plan)
        if new_k is not None:
            self.store.append_tokens(seq_ids, new_k, new_v, layer)
        t0 = time.perf_counter()
        result = run_validated(self.store, seq_ids, layer, m, q, p, backend, plan)
        self.counters.add(method, calls=1, bytes_read=result.bytes_read, seconds=time.perf_counter() - t0)
        self.count_host_coverage(method, layer, result)
        return result

    def count_host_coverage(self, method: str, layer: int, result: AttentionResult) -> None:
        """Count a result's coverage in the stats if it is on the host. A device result is not read back here: that
        would be a sync per call; the server counts it when it copies the reply out (count_coverage)."""
        if result.coverage is not None and result.coverage.device.type == "cpu":
            self.count_coverage(method, layer, result.coverage, result.fallback)

    def count_coverage(self, method: str, layer: int, coverage: torch.Tensor, fallback: torch.Tensor | None) -> None:
        """Count one call's coverage [B, Hq] (on the host) and fallbacks [B] in the stats, one estimate per
        sequence (its least covered query head's)."""
        fell = 0 if fallback is None else int(fallback.sum())
        self.coverage.add(method, layer, sequence_coverage(coverage).tolist(), fell)

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1) -> StepPlan:
        """Plan a decode step: every layer's attend(..., plan=) of these sequences then reuses one page table."""
        return self.store.plan_step(seq_ids, new_tokens)

    def begin_step(self, seq_ids: Sequence[str], q_heads: int, method: str = "dense",
                   params: Mapping[str, Any] | None = None, backend: str = "auto",
                   layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None = None) -> StepCalls:
        """A decode step checked and planned once (kvcache.methods.decode_step): each layer's attend(layer, q,
        new_k, new_v) only writes the new rows and attends."""
        return _CountedStep(DecodeStep(self.store, seq_ids, q_heads, method, params, backend, layer_methods), self)

    def attend_many(self, calls: Sequence[AttendCall]) -> tuple[list[AttentionResult | Exception], list[int]]:
        """Answers to several attend calls that arrived together, each its result or the error it raised, and the
        sizes of the groups that shared one store call.

        Calls share a call when they can be one batch (same layer, method, parameters, backend and tensor shapes and
        dtypes; a method whose bytes follow from lengths; an untiered store; no sequence named twice); each answer
        is then its rows of the shared result, with the bytes its own sequences' lengths give. If the shared call
        is refused before it wrote anything, each call is answered alone.
        """
        groups: dict[tuple, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(self._batch_key(call, i), []).append(i)
        answers: list[AttentionResult | Exception | None] = [None] * len(calls)
        merged = []
        for members in groups.values():
            shared = self._attend_shared([calls[i] for i in members]) if len(members) > 1 else None
            if shared is not None:
                merged.append(len(members))
            for j, i in enumerate(members):
                answers[i] = shared[j] if shared is not None else self._attend_alone(calls[i])
        return answers, merged

    def _attend_alone(self, call: AttendCall) -> AttentionResult | Exception:
        try:
            return self.attend(call.seq_ids, call.layer, call.q, call.method, call.params, call.new_k, call.new_v,
                               call.backend, call.plan)
        except Exception as exc:  # the caller answers each call with its own error
            return exc

    def _batch_key(self, call: AttendCall, i: int) -> tuple:
        """Calls with equal keys may share one store call; a call that may not gets a key of its own."""
        ids = list(call.seq_ids)
        method = METHODS.get(call.method)
        # A byte budget's parameters follow from the batch's lengths: shared with other calls, they would change.
        if (method is None or not method.batchable or self.config.tiered or call.plan is not None or not ids
                or BYTES in (call.params or {})
                or len(set(ids)) != len(ids)
                or not all(isinstance(t, torch.Tensor) for t in (call.q, call.new_k, call.new_v) if t is not None)):
            return ("alone", i)
        try:
            params = tuple(sorted((call.params or {}).items()))
            hash(params)
        except TypeError:
            return ("alone", i)
        # torch.cat would promote mixed dtypes silently: every tensor's dtype and row shape is part of the key.
        tensors = tuple(None if t is None else (t.dtype, tuple(t.shape[1:])) for t in (call.q, call.new_k, call.new_v))
        return (call.layer, call.method, call.backend, params, tensors)

    def _attend_shared(self, calls: list[AttendCall]) -> list[AttentionResult | Exception] | None:
        """One store call for calls of one batch key: their answers, or None if they must go alone (a sequence named
        twice across them, or the shared call refused before it wrote anything)."""
        ids = [s for c in calls for s in c.seq_ids]
        if len(set(ids)) != len(ids):
            return None
        first = calls[0]
        try:
            q = torch.cat([c.q for c in calls])
            new = {name: torch.cat([getattr(c, name) for c in calls]) for name in ("new_k", "new_v")
                   if getattr(first, name) is not None}
            before = self.store.lengths(ids, first.layer)
        except (KVCacheError, RuntimeError):  # mismatched tensors, an unknown sequence or layer: each its own answer
            return None
        try:
            result = self.attend(ids, first.layer, q, first.method, first.params, backend=first.backend, **new)
            lens = self.store.lengths(ids, first.layer)
        except KVCacheError as exc:
            # The caller holds the sequences' locks: their lengths tell whether anything was written.
            if self.store.lengths(ids, first.layer) == before:
                return None
            return [exc] * len(calls)
        except Exception as exc:
            return [exc] * len(calls)
        method = METHODS[first.method]
        params = method.parse(first.params)
        answers: list[AttentionResult | Exception] = []
        row = 0
        for c in calls:
            n = len(c.seq_ids)
            rows = slice(row, row + n)
            nbytes = method.bytes_read(self.config, lens[rows], params)
            fallback = None if result.fallback is None else result.fallback[rows]
            if fallback is not None:  # those sequences were read densely too
                fell = [S for S, f in zip(lens[rows], fallback.tolist()) if f]
                nbytes += DENSE.bytes_read(self.config, fell, DENSE.Params())
            coverage = None if result.coverage is None else result.coverage[rows]
            answers.append(AttentionResult(result.out[rows], result.lse[rows], nbytes, coverage=coverage,
                                           fallback=fallback))
            row += n
        return answers

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
            keys, values = store.read_positions(seq_id, layer, index)
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
        """Pool usage (pages per tier), per-method calls, bytes read and seconds, bytes moved between tiers, and per
        method and layer the coverage estimates and dense fallbacks (kvcache.stats.CoverageTotals)."""
        return {"pool": self.store.pool_usage(), "methods": self.counters.snapshot(),
                "bytes_moved": self.store.bytes_moved(), "coverage": self.coverage.snapshot()}

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
