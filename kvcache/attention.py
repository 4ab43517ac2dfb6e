"""attend(): validate a decode query, read the store through the page table, run the chosen method."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvcache.errors import DTypeMismatch, InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.methods import AttentionResult, dense, quest, sparq
from kvcache.store import KVStore, LayerView
from kvcache.table import PageTableCSR


def _run_dense(q, view: LayerView, csr: PageTableCSR, store: KVStore, seq_ids, layer, **p) -> AttentionResult:
    return dense(q, view.k_seq, view.v_seq, csr, **p)


def _run_sparq(q, view: LayerView, csr: PageTableCSR, store: KVStore, seq_ids, layer, **p) -> AttentionResult:
    return sparq(q, view.k_seq, view.k_dim, view.v_seq, store.value_mean(seq_ids, layer), csr, **p)


def _run_quest(q, view: LayerView, csr: PageTableCSR, store: KVStore, seq_ids, layer, **p) -> AttentionResult:
    return quest(q, view.k_seq, view.v_seq, view.k_summary, csr, **p)


# method name -> (runner, the reference whose keyword parameters it accepts)
METHODS: dict[str, tuple[Callable[..., AttentionResult], Callable[..., AttentionResult]]] = {
    "dense": (_run_dense, dense),
    "sparq": (_run_sparq, sparq),
    "quest": (_run_quest, quest),
}

_POSITIONAL = {"q", "k_seq", "k_dim", "v_seq", "k_summary", "value_mean", "csr"}


def method_parameters(method: str) -> list[str]:
    """Names of the keyword parameters `method` accepts."""
    _, reference = _lookup(method)
    return [n for n in inspect.signature(reference).parameters if n not in _POSITIONAL]


def attend(
    store: KVStore,
    seq_ids: Sequence[str],
    layer: int,
    q: torch.Tensor,
    method: str = "dense",
    params: Mapping[str, Any] | None = None,
) -> AttentionResult:
    """Decode attention of q [B, Hq, d] for sequences `seq_ids` at `layer` by `method` with `params`."""
    runner, _ = _lookup(method)
    params = dict(params or {})
    unknown = set(params) - set(method_parameters(method))
    if unknown:
        raise InvalidParameter(f"{method}: unknown parameters {sorted(unknown)}; accepted: {method_parameters(method)}")
    q = check_query(store, seq_ids, q)
    csr = store.page_table(seq_ids, layer)
    empty = [s for s, n in zip(seq_ids, csr.seq_lens().tolist()) if n == 0]
    if empty:
        raise PositionOutOfRange(f"sequence {empty[0]} has no cached positions at layer {layer}")
    return runner(q, store.layer_view(layer), csr, store, list(seq_ids), layer, **params)


def check_query(store: KVStore, seq_ids: Sequence[str], q: torch.Tensor) -> torch.Tensor:
    """q on the store's device after checking it is [B, Hq, d] with Hq a multiple of Hkv, in the store's dtype."""
    c = store.config
    if not isinstance(q, torch.Tensor):
        raise ShapeMismatch(f"q must be a torch.Tensor, got {type(q).__name__}")
    if len(seq_ids) == 0:
        raise ShapeMismatch("attend needs at least one sequence")
    if q.dim() != 3 or q.shape[0] != len(seq_ids) or q.shape[2] != c.head_dim or q.shape[1] % c.num_kv_heads:
        raise ShapeMismatch(
            f"q has shape {tuple(q.shape)}; expected [B={len(seq_ids)}, Hq (a multiple of Hkv={c.num_kv_heads}), "
            f"d={c.head_dim}]"
        )
    if q.dtype != c.dtype:
        raise DTypeMismatch(f"q has dtype {q.dtype}; the store holds {c.dtype}")
    if len(set(seq_ids)) != len(seq_ids):
        raise InvalidParameter("a sequence appears twice in one attend call")
    return q.to(c.device)


def _lookup(method: str) -> tuple[Callable[..., AttentionResult], Callable[..., AttentionResult]]:
    if method not in METHODS:
        raise InvalidParameter(f"unknown attention method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]
