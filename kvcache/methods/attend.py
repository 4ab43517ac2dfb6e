"""attend(): validate a decode query, read the store through the page table, run the chosen method."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import DTypeMismatch, InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.store.host_copy import on_device
from kvcache.methods import AttentionResult, dense, quest, sparq
from kvcache.methods.dense_cpu import dense_cpu
from kvcache.methods.gate import gate
from kvcache.methods.oracle import check_oracle_params, oracle
from kvcache.methods.quest import check_quest_params
from kvcache.methods.sparq import check_common_params, check_sparq_params
from kvcache.methods.traffic import dense_bytes, gate_budget_pages, gate_bytes, quest_bytes, sparq_bytes
from kvcache.store import KVStore
from kvcache.store.page_table import PageTableCSR


@dataclass(frozen=True)
class Method:
    """An attention method: its torch reference (whose keywords are the method's parameters),
    its Triton path, the check of its parameters, and the formula of the bytes it reads."""

    reference: Callable[..., AttentionResult]
    reads: tuple[str, ...]  # LayerView fields the method takes, in order, after q
    uses_value_mean: bool
    check: Callable[[KVCacheConfig, Sequence[int], dict], None]
    traffic: Callable[[KVCacheConfig, PageTableCSR, dict], int]
    triton: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_gate: bool = False  # takes the store's page gate (kvcache.methods.gate_store) for the layer after `reads`
    cpu: Callable[..., AttentionResult] | None = None  # a faster CPU path than the reference, if any


def _triton_dense(*args, **kw):
    from kvcache.kernels.paged_decode import paged_decode

    return paged_decode(*args, **kw)


def _triton_sparq(*args, **kw):
    from kvcache.kernels.sparq import sparq_decode

    return sparq_decode(*args, **kw)


def _triton_quest(*args, **kw):
    from kvcache.kernels.quest import quest_decode

    return quest_decode(*args, **kw)


def _triton_gate(*args, **kw):
    from kvcache.methods.gate_gpu import gate_decode

    return gate_decode(*args, **kw)


def _check_gate(config: KVCacheConfig, lens: Sequence[int], p: dict) -> None:
    from kvcache.methods.gate import check_gate_params

    check_gate_params(p.get("budget"), p.get("threshold"))
    if config.tiered:
        raise InvalidParameter("gate: not available on tiered stores yet (use quest or sparq there)")


def _gate_traffic(c: KVCacheConfig, csr: PageTableCSR, p: dict) -> int:
    # With a threshold the count is data-dependent: this is the budget's bound, for a gate of the default
    # dimension keeping its keys in the KV dtype; the paths return exact bytes.
    from kvcache.methods.gate import GATE_DIM

    pages = [[gate_budget_pages(S, c.page_size, p.get("budget"))] * c.num_kv_heads for S in csr.host_lens]
    return gate_bytes(csr.host_lens, c.page_size, pages, c.head_dim, c.itemsize, GATE_DIM, c.itemsize)


def _check_oracle(config: KVCacheConfig, lens: Sequence[int], p: dict) -> None:
    check_oracle_params(p["budget"])
    if config.tiered:
        raise InvalidParameter("oracle: not available on tiered stores")


def _oracle_traffic(c: KVCacheConfig, csr: PageTableCSR, p: dict) -> int:
    pages = [[gate_budget_pages(S, c.page_size, p["budget"])] * c.num_kv_heads for S in csr.host_lens]
    return gate_bytes(csr.host_lens, c.page_size, pages, c.head_dim, c.itemsize, 0, 0)


def _oracle_on_device(*args, **kw):
    result = oracle(*args, **kw)
    return result.out, result.lse, result.bytes_read


def _no_check(config: KVCacheConfig, lens: Sequence[int], p: dict) -> None:
    pass


def _check_sparq(config: KVCacheConfig, lens: Sequence[int], p: dict) -> None:
    check_sparq_params(config.head_dim, list(lens), p["r"], p["k"], p.get("local_window", 0))


METHODS: dict[str, Method] = {
    "dense": Method(
        dense, ("k_seq", "v_seq"), False, _no_check,
        lambda c, csr, p: dense_bytes(csr.host_lens, c.num_kv_heads, c.head_dim, c.itemsize),
        _triton_dense, cpu=dense_cpu,
    ),
    "sparq": Method(
        sparq, ("k_seq", "k_dim", "v_seq"), True, _check_sparq,
        lambda c, csr, p: sparq_bytes(csr.host_lens, c.num_kv_heads, c.head_dim, p["r"], p["k"], c.itemsize),
        _triton_sparq,
    ),
    "quest": Method(
        quest, ("k_seq", "v_seq", "k_summary"), False, lambda c, lens, p: check_quest_params(p["top_pages"]),
        lambda c, csr, p: quest_bytes(csr.host_lens, c.page_size, p["top_pages"], c.num_kv_heads, c.head_dim, c.itemsize),
        _triton_quest,
    ),
    "gate": Method(
        gate, ("k_seq", "v_seq", "k_summary"), False, _check_gate, _gate_traffic, _triton_gate, needs_gate=True,
    ),
    # Evaluation only (kvcache.methods.oracle): the choice reads every position. The torch reference runs on
    # any device; its bytes are the chosen pages' rows.
    "oracle": Method(oracle, ("k_seq", "v_seq"), False, _check_oracle, _oracle_traffic, _oracle_on_device),
}

BACKENDS = ("auto", "torch", "triton")

# Arguments every reference takes positionally; the rest are the method's parameters.
_POSITIONAL = {"q", "k_seq", "k_dim", "v_seq", "k_summary", "value_mean", "layer_gate", "csr"}

def method_parameters(method: str) -> list[str]:
    """Names of the keyword parameters `method` accepts."""
    return list(_parameters(_lookup(method).reference)[0])


@functools.cache
def _parameters(reference: Callable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # (accepted, required) keywords of a reference; cached: inspect.signature costs tens of us per decode call.
    params = inspect.signature(reference).parameters
    accepted = tuple(n for n in params if n not in _POSITIONAL)
    return accepted, tuple(n for n in accepted if params[n].default is inspect.Parameter.empty)


def validate(
    store: KVStore,
    seq_ids: Sequence[str],
    layer: int,
    q: torch.Tensor,
    method: str,
    params: Mapping[str, Any] | None,
    backend: str = "auto",
    extra_positions: int = 0,
) -> tuple[Method, torch.Tensor, dict]:
    """Check a decode query, method, parameters and sequences as if each held `extra_positions` more;
    returns the method, q on the store's device, and the parameters. Changes nothing."""
    m = _lookup(method)
    if backend not in BACKENDS:
        raise InvalidParameter(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    params = dict(params or {})
    accepted, required = _parameters(m.reference)
    unknown = set(params) - set(accepted)
    if unknown:
        raise InvalidParameter(f"{method}: unknown parameters {sorted(unknown)}; accepted: {list(accepted)}")
    missing = [n for n in required if n not in params]
    if missing:
        raise InvalidParameter(f"{method}: missing required parameters {missing}")
    check_common_params(params.get("scale"), params.get("reallocate", True))
    q = check_query(store, seq_ids, q)
    lens = [n + extra_positions for n in store.lengths(seq_ids, layer)]
    empty = [s for s, n in zip(seq_ids, lens) if n == 0]
    if empty:
        raise PositionOutOfRange(f"sequence {empty[0]} has no cached positions at layer {layer}")
    m.check(store.config, lens, params)
    if m.needs_gate:
        from kvcache.methods.gate_store import gate_of

        gate_of(store, q.shape[1])  # GateMissing (FAILED_PRECONDITION) before any work
    return m, q, params


def attend(
    store: KVStore,
    seq_ids: Sequence[str],
    layer: int,
    q: torch.Tensor,
    method: str = "dense",
    params: Mapping[str, Any] | None = None,
    backend: str = "auto",
) -> AttentionResult:
    """Decode attention of q [B, Hq, d] for sequences `seq_ids` at `layer` by `method` with `params`.

    backend "auto" runs the Triton kernels when the store is on CUDA, a method's CPU path (Method.cpu) on
    the CPU, and the torch reference otherwise; "torch" or "triton" forces one (tests run "triton" on the
    CPU interpreter).
    """
    m, q, params = validate(store, seq_ids, layer, q, method, params, backend)
    return run_validated(store, seq_ids, layer, m, q, params, backend)


def run_validated(
    store: KVStore, seq_ids: Sequence[str], layer: int, m: Method, q: torch.Tensor, params: dict, backend: str
) -> AttentionResult:
    """Run a method on what validate() returned: the attention half of attend()."""
    unsupported = triton_unsupported(store.config)
    if backend == "triton" and unsupported:
        raise InvalidParameter(f"the Triton kernels cannot serve this store: {unsupported}")
    if store.tiers is not None:
        from kvcache.methods.tiered import attend_tiered

        use_triton = backend == "triton" or (backend == "auto" and q.device.type == "cuda" and not unsupported)
        with store.lock:  # pages must not move while their rows are read
            csr = store.page_table(seq_ids, layer)
            return attend_tiered(store, list(seq_ids), layer, _name_of(m), q, params, use_triton,
                                 m.traffic(store.config, csr, params))
    csr = store.page_table(seq_ids, layer)
    view = store.layer_view(layer)
    tensors = [getattr(view, name) for name in m.reads]
    if m.uses_value_mean:
        tensors.append(store.value_mean(seq_ids, layer))
    if m.needs_gate:
        from kvcache.methods.gate_store import layer_gate_of

        tensors.append(layer_gate_of(store, layer))
    if backend == "auto" and q.device.type == "cpu" and m.cpu is not None:
        return m.cpu(q, *tensors, csr, **params)
    if backend == "torch" or (backend == "auto" and (q.device.type != "cuda" or unsupported)):
        return m.reference(q, *tensors, csr, **params)
    result = m.triton(q, *tensors, csr, **params)
    if len(result) == 3:  # a path that counts its own bytes (data-dependent choices)
        return AttentionResult(*result)
    out, lse = result
    return AttentionResult(out, lse, m.traffic(store.config, csr, params))


def triton_unsupported(config: KVCacheConfig) -> str | None:
    """Why the Triton kernels cannot run on stores of this shape, or None if they can."""
    d, P = config.head_dim, config.page_size
    if d & (d - 1) or d < 16:
        return f"head_dim {d} is not a power of two >= 16"
    if P & (P - 1) or P > 256:
        return f"page_size {P} is not a power of two <= 256"
    return None


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
    # Each torch call costs microseconds of host time in a decode step's layer call: only when needed.
    if not on_device(q, c.device):
        q = q.to(c.device)
    return q if q.is_contiguous() else q.contiguous()


def _name_of(m: Method) -> str:
    return next(name for name, known in METHODS.items() if known is m)


def _lookup(method: str) -> Method:
    if method not in METHODS:
        raise InvalidParameter(f"unknown attention method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]
