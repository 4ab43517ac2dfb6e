"""DecodeStep: a decode step of a batch checked and planned once, then run layer by layer.

A step makes one call per layer over the same sequences. Everything that does not change between those calls is
done when the step begins (docs/architecture.md, "Plan once per step"): the method and parameters of every layer
parsed and checked against the batch's lengths, the working-memory estimate, the gate's presence, the pages of the
new positions allocated, the page table built on the device, and where each sequence's new row goes in every layer
(KVStore.plan_rows). A layer's call then checks only its tensors' shapes, writes the new rows (one launch on CUDA)
and attends, with no validation, page-table build or host-to-device copy of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvcache.errors import DTypeMismatch, InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.methods.attend import BACKENDS, check_sequences, check_work, run_validated, triton_unsupported
from kvcache.methods.base import AttentionMethod, Params
from kvcache.methods.byte_budget import budget_of, budget_params
from kvcache.methods.gate_store import gate_of
from kvcache.methods.registry import lookup
from kvcache.methods.result import AttentionResult
from kvcache.store import KVStore
from kvcache.store.host_copy import on_device
from kvcache.store.step_plan import StepRows

MethodChoice = tuple[str, Mapping[str, Any] | None]


class DecodeStep:
    """One decode step of `seq_ids` in which every layer's call appends one new row per sequence and attends with
    `method` (or the method `layer_methods` gives that layer) for `q_heads` query heads."""

    def __init__(self, store: KVStore, seq_ids: Sequence[str], q_heads: int, method: str = "dense",
                 params: Mapping[str, Any] | None = None, backend: str = "auto",
                 layer_methods: Mapping[int, MethodChoice] | None = None) -> None:
        c = store.config
        if backend not in BACKENDS:
            raise InvalidParameter(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if q_heads < 1 or q_heads % c.num_kv_heads:
            raise ShapeMismatch(f"{q_heads} query heads is not a positive multiple of Hkv={c.num_kv_heads}")
        check_sequences(seq_ids)
        if backend == "triton" and triton_unsupported(c):
            raise InvalidParameter(f"the Triton kernels cannot serve this store: {triton_unsupported(c)}")
        choices = {None: (method, params), **dict(layer_methods or {})}
        for layer in choices:
            if layer is not None and not (isinstance(layer, int) and 0 <= layer < c.num_layers):
                raise PositionOutOfRange(f"layer {layer!r} out of range [0, {c.num_layers})")
        lens = [n + 1 for n in store.lengths(seq_ids, 0)]  # checked before any page is taken
        share, given = budget_of(params)
        if share is not None:  # a byte budget: each layer's own parameters, from its share at these lengths
            m = lookup(method)
            own = {layer: (method, budget_params(store, m, share, given, layer, lens)) for layer in range(c.num_layers)}
            choices = {**own, **{k: v for k, v in choices.items() if k is not None}, None: own[0]}
        parsed = {key: (lookup(name), lookup(name).parse(values)) for key, (name, values) in choices.items()}
        for m, p in parsed.values():
            m.check(c, lens, p)
            check_work(store, m, lens, q_heads, p)
            if m.needs_gate:
                gate_of(store, q_heads)
        self.store = store
        self.seq_ids = list(seq_ids)
        self.q_heads = q_heads
        self.backend = backend
        self._default = parsed.pop(None)
        self._layers: dict[int, tuple[AttentionMethod, Params]] = parsed
        self.rows: StepRows = store.plan_rows(seq_ids)
        self._q_shape = (len(seq_ids), q_heads, c.head_dim)
        self._row_shape = (len(seq_ids), c.num_kv_heads, c.head_dim)

    def method_name(self, layer: int) -> str:
        """The method `layer` runs."""
        return self._layers.get(layer, self._default)[0].name

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor) -> AttentionResult:
        """Append new_k, new_v [B, Hkv, d] as each sequence's next position at `layer` and attend q [B, Hq, d] over
        it: out [B, Hq, d], lse [B, Hq], the bytes read."""
        c = self.store.config
        if tuple(q.shape) != self._q_shape or tuple(new_k.shape) != self._row_shape or new_v.shape != new_k.shape:
            raise ShapeMismatch(f"a step of this batch takes q {self._q_shape} and new rows {self._row_shape}; got "
                                f"{tuple(q.shape)}, {tuple(new_k.shape)}, {tuple(new_v.shape)}")
        if not (q.dtype == new_k.dtype == new_v.dtype == c.dtype):
            raise DTypeMismatch(f"q and the new rows must be {c.dtype}; got {q.dtype}, {new_k.dtype}, {new_v.dtype}")
        if not 0 <= layer < c.num_layers:
            raise PositionOutOfRange(f"layer {layer} out of range [0, {c.num_layers})")
        dev = c.device
        if not (on_device(q, dev) and on_device(new_k, dev) and on_device(new_v, dev)):
            q, new_k, new_v = q.to(dev), new_k.to(dev), new_v.to(dev)
        m, p = self._layers.get(layer, self._default)
        self.store.append_planned(self.rows, layer, new_k.contiguous(), new_v.contiguous())
        return run_validated(self.store, self.seq_ids, layer, m, q if q.is_contiguous() else q.contiguous(), p,
                             self.backend, self.rows.plan)
