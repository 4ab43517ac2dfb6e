"""attend(): check a decode query once, let the method select on the device, attend where the rows live.

One path for every method and every store (docs/architecture.md): validate -> method.select (torch) or
method.select_gpu (Triton) -> attention over the selection, split by tier and merged by lse
(kvcache.methods.selection_attention). An untiered store is the one-tier case; on an untiered CPU store a
method may take a faster whole path of its own (AttentionMethod.run_cpu).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import CallTooLarge, DTypeMismatch, InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.methods.base import AttentionMethod, Params, scale_of
from kvcache.methods.byte_budget import budget_of, budget_params
from kvcache.methods.coverage import selection_coverage, sequence_coverage
from kvcache.methods.dense import DENSE
from kvcache.methods.gate_store import gate_of
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.registry import lookup
from kvcache.methods.result import AttentionResult
from kvcache.methods.selection_attention import attend_torch, attend_triton
from kvcache.store import KVStore
from kvcache.store.host_copy import on_device
from kvcache.store.step_plan import StepPlan
from kvcache.store.tiers import DISK

BACKENDS = ("auto", "torch", "triton")


def check_query(config: KVCacheConfig, q: Any, rows: int | None = None) -> None:
    """Raise unless q is a tensor [rows, Hq, d] (rows None: a chunk of T >= 1 queries) with Hq a multiple of Hkv,
    in the store's dtype."""
    if not isinstance(q, torch.Tensor):
        raise ShapeMismatch(f"q must be a torch.Tensor, got {type(q).__name__}")
    if rows == 0:
        raise ShapeMismatch("attend needs at least one sequence")
    if (q.dim() != 3 or q.shape[2] != config.head_dim or q.shape[1] % config.num_kv_heads
            or (q.shape[0] != rows if rows is not None else q.shape[0] < 1)):
        lead = "a chunk [T >= 1" if rows is None else f"[B={rows}"
        raise ShapeMismatch(f"q has shape {tuple(q.shape)}; expected {lead}, Hq (a multiple of "
                            f"Hkv={config.num_kv_heads}), d={config.head_dim}]")
    if q.dtype != config.dtype:
        raise DTypeMismatch(f"q has dtype {q.dtype}; the store holds {config.dtype}")


def check_new_rows(config: KVCacheConfig, rows: int, new_k: Any, new_v: Any) -> None:
    """Raise unless new_k and new_v are both None or both tensors [rows, Hkv, d] (a decode step's new token)."""
    if (new_k is None) != (new_v is None):
        raise InvalidParameter("new_k and new_v must be given together")
    if new_k is None:
        return
    want = (rows, config.num_kv_heads, config.head_dim)
    for name, t in (("new_k", new_k), ("new_v", new_v)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeMismatch(f"{name} has shape {got}; expected [B, Hkv, d] = {want}")


def check_work(store: KVStore, m: AttentionMethod, lens: Sequence[int], q_heads: int, p: Params) -> None:
    """CallTooLarge if a call of `m` over sequences of `lens` positions with `q_heads` query heads would need more
    working memory than store.max_call_bytes allows (an estimate made before any work)."""
    limit = store.max_call_bytes
    if limit is not None and lens and (need := m.work_bytes(store.config, lens, q_heads, p)) > limit:
        raise CallTooLarge(f"{m.name} over {len(lens)} sequences of up to {max(lens)} positions with {q_heads} "
                           f"query heads needs about {need / 2**20:,.0f} MiB of working memory; this store allows "
                           f"{limit / 2**20:,.0f} MiB per call: send fewer sequences or query heads per call")


def check_sequences(seq_ids: Sequence[str]) -> None:
    """Raise unless the call names each sequence once."""
    if len(set(seq_ids)) != len(seq_ids):
        raise InvalidParameter("a sequence appears twice in one attend call")


def validate(
    store: KVStore,
    seq_ids: Sequence[str],
    layer: int,
    q: torch.Tensor,
    method: str,
    params: Mapping[str, Any] | None,
    backend: str = "auto",
    extra_positions: int = 0,
    plan: StepPlan | None = None,
) -> tuple[AttentionMethod, torch.Tensor, Params]:
    """Check a decode query, method, parameters and sequences as if each held `extra_positions` more (and, with
    a step's `plan`, that the plan still holds); returns the method, q on the store's device, and the parsed
    parameters. Changes nothing."""
    m = lookup(method)
    if backend not in BACKENDS:
        raise InvalidParameter(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    share, given = budget_of(params)
    p = m.parse(params) if share is None else None  # a byte budget's parameters follow from the lengths
    c = store.config
    check_query(c, q, len(seq_ids))
    check_sequences(seq_ids)
    if plan is not None:
        store.check_plan(plan, seq_ids, layer, appending=extra_positions > 0)
        lens = [n + plan.new_tokens for n in plan.start_lengths]
    else:
        lens = [n + extra_positions for n in store.lengths(seq_ids, layer)]
    empty = [s for s, n in zip(seq_ids, lens) if n == 0]
    if empty:
        raise PositionOutOfRange(f"sequence {empty[0]} has no cached positions at layer {layer}")
    if p is None:
        p = m.parse(budget_params(store, m, share, given, layer, lens))
    m.check(c, lens, p)
    check_work(store, m, lens, q.shape[1], p)
    if m.needs_gate:
        gate_of(store, q.shape[1])  # GateMissing (FAILED_PRECONDITION) before any work
    if backend == "triton" and triton_unsupported(c):
        raise InvalidParameter(f"the Triton kernels cannot serve this store: {triton_unsupported(c)}")
    if backend == "triton" and c.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidParameter("backend 'triton' needs a CUDA store (a CPU store runs the Triton kernels only under "
                               "TRITON_INTERPRET=1); use 'auto' or 'torch'")
    # Each torch call costs microseconds of host time in a decode step's layer call: only when needed.
    if not on_device(q, c.device):
        q = q.to(c.device)
    return m, (q if q.is_contiguous() else q.contiguous()), p


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

    backend "auto" runs the Triton kernels when the store is on CUDA and the torch path elsewhere (a method's own
    CPU path where it has one); "torch" or "triton" forces one (tests run "triton" on the CPU interpreter).
    """
    m, q, p = validate(store, seq_ids, layer, q, method, params, backend)
    return run_validated(store, seq_ids, layer, m, q, p, backend)


def run_validated(store: KVStore, seq_ids: Sequence[str], layer: int, m: AttentionMethod, q: torch.Tensor,
                  p: Params, backend: str, plan: StepPlan | None = None) -> AttentionResult:
    """Run a method on what validate() returned: the attention half of attend(). With a step's `plan`, its page
    table is used as is (built once for every layer of the step)."""
    c = store.config
    gpu = backend == "triton" or (backend == "auto" and q.device.type == "cuda" and not triton_unsupported(c))
    # Pages must not move between tiers while their rows are read.
    with store.lock if store.tiers is not None else contextlib.nullcontext():
        csr = store.page_table(seq_ids, layer) if plan is None else plan.csr
        inputs = LayerInputs(store, seq_ids, layer, csr)
        if gpu and store.tiers is not None and csr.indices.numel():
            gpu = not bool((store.tiers.tier_dev[csr.indices.long()] == DISK).any())  # the kernels cannot read disk
        if not gpu and backend == "auto" and store.tiers is None and q.device.type == "cpu":
            fast = m.run_cpu(q, inputs, p)
            if fast is not None:
                return with_fallback(store, seq_ids, layer, m, q, p, backend, fast)
        if gpu:
            sel = m.select_gpu(q, inputs, p)
            out, lse, alpha = attend_triton(q, inputs, sel, p.scale, with_alpha=True)
        else:
            sel = m.select(q, inputs, p)
            out, lse = attend_torch(q, inputs, sel, scale_of(p, q.shape[-1]))
            alpha = sel.alpha
        nbytes = sel.bytes_read if sel.bytes_read is not None else m.bytes_read(c, csr.host_lens, p)
        coverage = selection_coverage(sel, alpha, q.shape[0], q.shape[1], q.device)  # on the device: no sync
        result = AttentionResult(out, lse, nbytes, dict(inputs.moves.bytes), coverage=coverage)
        return with_fallback(store, seq_ids, layer, m, q, p, backend, result)


def with_fallback(store: KVStore, seq_ids: Sequence[str], layer: int, m: AttentionMethod, q: torch.Tensor,
                  p: Params, backend: str, result: AttentionResult) -> AttentionResult:
    """`result` of method m, with the sequences whose coverage estimate (their least covered query head's) falls
    below p.min_coverage attended densely instead, their bytes added as dense's (docs/sparse-attention.md,
    "Coverage"). Deciding reads the estimate back to the host: a sync, made only when min_coverage is given."""
    if p.min_coverage is None:
        return result
    if m is DENSE:  # it covers every position: nothing falls back, and there is nothing to read back
        return replace(result, fallback=torch.zeros(q.shape[0], dtype=torch.bool))
    if result.coverage is None:  # methods without an estimate refuse min_coverage in their check
        raise InvalidParameter(f"{m.name}: min_coverage needs a coverage estimate and this method has none")
    fell = (sequence_coverage(result.coverage) < p.min_coverage).cpu()
    if not fell.any():
        return replace(result, fallback=fell)
    rows = torch.nonzero(fell).flatten()
    again = run_validated(store, [seq_ids[b] for b in rows.tolist()], layer, DENSE, q[rows.to(q.device)],
                          DENSE.Params(scale=p.scale), backend)
    at = rows.to(result.out.device)
    moved = dict(result.bytes_moved)
    for key, n in again.bytes_moved.items():
        moved[key] = moved.get(key, 0) + n
    return AttentionResult(result.out.index_copy(0, at, again.out.to(result.out.dtype)),
                           result.lse.index_copy(0, at, again.lse), result.bytes_read + again.bytes_read, moved,
                           coverage=result.coverage, fallback=fell)


def triton_unsupported(config: KVCacheConfig) -> str | None:
    """Why the Triton kernels cannot run on stores of this shape, or None if they can."""
    d, P = config.head_dim, config.page_size
    if d & (d - 1) or d < 16:
        return f"head_dim {d} is not a power of two >= 16"
    if P & (P - 1) or P > 256:
        return f"page_size {P} is not a power of two <= 256"
    return None
