"""SparQ Attention (docs/sparse-attention.md §1): two-stage fetch with mean-value reallocation; the torch reference,
the selection on the device, and the Triton selection (stage 1 on the dim-major keys, the group's top-k)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_ROWS
from kvcache.kernels.sparq import sparq_select, sparq_stage1
from kvcache.kernels.tuning import TUNING
from kvcache.methods.base import REQUIRED, AttentionMethod, Params, Selection, param, scale_of
from kvcache.methods.coverage import reference_args
from kvcache.methods.dense import DenseParams, attend_rows
from kvcache.methods.gather import gather_key_dims, gather_rows, runs_fit
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult
from kvcache.methods.sparq_cpu import sparq_cpu

VALUE_MEAN_ITEMSIZE = SUMMARY_DTYPE.itemsize  # the mean value comes from float32 running sums


def sparq_bytes(lens: Sequence[int], num_kv_heads: int, d: int, r: int, k: int, itemsize: int) -> int:
    """Per kv head: S*r key elements (stage 1), 2*k*d rows (stage 2), d of the mean value (float32)."""
    return sum(((S * r + 2 * k * d) * itemsize + d * VALUE_MEAN_ITEMSIZE) * num_kv_heads for S in lens)


def check_sparq_params(d: int, seq_lens: list[int], r: int, k: int, local_window: int) -> None:
    """Raise InvalidParameter unless 1 <= r <= d, 1 <= k <= S for every sequence, 0 <= local_window <= k."""
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= d:
        raise InvalidParameter(f"sparq: r={r!r} must be in [1, d={d}]")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidParameter(f"sparq: k={k!r} must be a positive int")
    if not isinstance(local_window, int) or isinstance(local_window, bool) or not 0 <= local_window <= k:
        raise InvalidParameter(f"sparq: local_window={local_window!r} must be in [0, k={k}]")
    short = [S for S in seq_lens if k > S]
    if short:
        raise InvalidParameter(f"sparq: k={k} exceeds the cached length S={min(short)} of a sequence in the batch")


def check_common_params(scale: float | None, reallocate: bool = True) -> None:
    """Raise InvalidParameter unless scale is None or a positive finite number and reallocate a bool."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise InvalidParameter(f"scale={scale!r} must be a positive finite number (or None for 1/sqrt(d))")
    if not isinstance(reallocate, bool):
        raise InvalidParameter(f"reallocate={reallocate!r} must be a bool")


def i1_of(qg: torch.Tensor, r: int) -> torch.Tensor:
    """§1 step 1: the r components [Hkv, r] with the largest |q|, summed over the group so it reads them once."""
    return torch.topk(qg.abs().sum(dim=1), r, dim=-1).indices


def select_rows(
    qg: torch.Tensor, k_i1: torch.Tensor, r: int, S: int, k: int, local_window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """§1 steps 2-5 for one sequence: positions i2 [Hkv, k] and alpha [Hkv, G].

    qg [Hkv, G, d] float32; k_i1 [Hkv, r, S]: components i1_of(qg, r) of every key (dim-major reads).
    """
    Hkv, G, _ = qg.shape
    i1 = i1_of(qg, r)
    q_i1 = torch.gather(qg, 2, i1[:, None, :].expand(Hkv, G, r))  # [Hkv, G, r]
    # 2. tau per query head, from the L1 mass its chosen components cover: sqrt(d * ratio) at
    # the default scale 1/sqrt(d), sqrt(ratio) / scale in general. A head with no mass on i1
    # (or q = 0) keeps ratio 1: its approximate logits are all 0 whatever tau is.
    covered, total = q_i1.abs().sum(-1), qg.abs().sum(-1)
    ratio = torch.where((covered > 0) & (total > 0), covered / total.clamp(min=1e-30), 1.0)
    tau = torch.sqrt(ratio) / scale  # [Hkv, G]
    # 3. shat over all S positions from the r chosen key components.
    shat = torch.softmax(torch.einsum("hgr,hrs->hgs", q_i1, k_i1.float()) / tau[..., None], dim=-1)
    # 4. i2: the local window, and the top k - l of the group's shat before it. Ranking by the group
    # mean (same order as the sum) keeps shat <= 1; the window is always taken, so it is not ranked.
    free = S - local_window
    window = torch.arange(free, S, device=qg.device).expand(Hkv, local_window)
    i2 = torch.cat([top_positions(shat[:, :, :free].mean(dim=1), k - local_window), window], dim=1)  # [Hkv, k]
    # 5. alpha per query head: approximate attention mass the chosen rows cover.
    alpha = torch.gather(shat, 2, i2[:, None, :].expand(Hkv, G, k)).sum(-1)  # [Hkv, G]
    return i2, alpha


def top_positions(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Positions [R, n] (int64, any order) of the n largest of each row of scores [R, S]; ties broken arbitrarily
    (a NaN ranks last on the CPU, first elsewhere: scores of finite inputs have none)."""
    if n <= 0:
        return torch.empty((scores.shape[0], 0), dtype=torch.int64, device=scores.device)
    if scores.device.type != "cpu" or n >= scores.shape[1]:
        return torch.topk(scores, n, dim=-1, sorted=False).indices
    # numpy's introselect: 35 us for 3 rows of 8192 at n = 372, where torch.topk took 129 us (the 2-core CPU).
    return torch.from_numpy(np.argpartition(-scores.float().numpy(), n - 1, axis=1)[:, :n])


def reallocate_mean(y: torch.Tensor, alpha: torch.Tensor, value_mean: torch.Tensor) -> torch.Tensor:
    """§1 step 7: alpha * y + (1 - alpha) * vbar; y [Hkv, G, d], alpha [Hkv, G], value_mean [Hkv, d]."""
    vbar = value_mean.float()[:, None, :]
    return alpha[..., None] * y + (1 - alpha[..., None]) * vbar


def sparq(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    k_dim: torch.Tensor,
    v_seq: torch.Tensor,
    value_mean: torch.Tensor,
    csr: PageTableCSR,
    r: int,
    k: int,
    local_window: int = 0,
    reallocate: bool = True,
    scale: float | None = None,
) -> AttentionResult:
    """SparQ decode attention of q [B, Hq, d] (§1, GQA as §1 says); value_mean [B, Hkv, d] f32.

    Stage 1 reads r components of every key from `k_dim`; stage 2 reads k rows of K and V
    from `k_seq` / `v_seq`. The lse returned is that of the exact stage-2 scores, so merging
    SparQ results of several shards or tiers by lse (§4) is approximate: each part's mean-value
    reallocation and its top-k were decided on its own positions only.
    """
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    G = Hq // Hkv
    seq_lens = list(csr.host_lens)
    check_sparq_params(d, seq_lens, r, k, local_window)
    check_common_params(scale, reallocate)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    coverage = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b, S in enumerate(seq_lens):
        qg = q[b].view(Hkv, G, d).float()
        i2, alpha = select_rows(qg, gather_key_dims(k_dim, csr, b, i1_of(qg, r)), r, S, k, local_window, scale)
        coverage[b] = alpha.reshape(Hq).clamp(0.0, 1.0)  # the estimate, whether or not it reallocates
        if not reallocate:
            alpha = torch.ones_like(alpha)
        # 6. exact softmax over the k chosen rows (sequence-major reads).
        k_rows = gather_rows(k_seq, csr, b, i2)
        v_rows = gather_rows(v_seq, csr, b, i2)
        y, s = attend_rows(qg, k_rows, v_rows, scale)
        out[b], lse[b] = reallocate_mean(y, alpha, value_mean[b]).reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return AttentionResult(out, lse, sparq_bytes(csr.host_lens, Hkv, d, r, k, k_seq.element_size()),
                           coverage=coverage)


@dataclass(frozen=True, kw_only=True)
class SparqParams(Params):
    """SparQ's parameters (docs/sparse-attention.md §1)."""

    r: int = param(REQUIRED, doc="query components per group used to score positions (1..d)", lo=1, cli=16)
    k: int = param(REQUIRED, doc="positions read per kv head (1..S)", lo=1, cli=256)
    local_window: int = param(0, doc="most recent positions always among the k (0..k)", lo=0, cli="k/4")
    reallocate: bool = param(True, doc="mean-value reallocation: alpha * out + (1 - alpha) * mean value")


class Sparq(AttentionMethod):
    """Two-stage fetch: r components of every key pick k rows; exact attention over them."""

    name = "sparq"
    Params = SparqParams
    # Its k spends the budget on rows, as the allocation's curves measure (docs/methods.md, "Byte budgets").
    follows_allocation = True
    exact = False  # each part chooses its rows and reallocates its mean value on its own positions
    needs_value_mean = True
    doc = "SparQ: r query components score every position, exact attention over the best k"

    def check(self, config: KVCacheConfig, lens: Sequence[int], p: SparqParams) -> None:
        check_sparq_params(config.head_dim, list(lens), p.r, p.k, p.local_window)

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: SparqParams) -> int:
        return sparq_bytes(lens, config.num_kv_heads, config.head_dim, p.r, p.k, config.itemsize)

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: SparqParams) -> AttentionResult:
        view = inputs.view
        return sparq(q, view.k_seq, view.k_dim, view.v_seq, inputs.value_mean, inputs.csr, **reference_args(p))

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: SparqParams) -> Selection:
        B, Hq, d = q.shape
        Hkv = inputs.num_kv_heads
        scale = scale_of(p, d)
        items, alphas = [], []
        for b, S in enumerate(inputs.csr.host_lens):
            qg = q[b].view(Hkv, Hq // Hkv, d).float()
            k_i1 = gather_key_dims(inputs.view.k_dim, inputs.csr, b, i1_of(qg, p.r))
            i2, alpha = select_rows(qg, k_i1, p.r, S, p.k, p.local_window, scale)
            items.append(i2)
            alphas.append(alpha)
        alpha = torch.cat(alphas)
        if p.reallocate:
            return Selection(MODE_ROWS, torch.cat(items), alpha=alpha)
        return Selection(MODE_ROWS, torch.cat(items), estimate=lambda: alpha)  # alpha for the coverage only

    def run_cpu(self, q: torch.Tensor, inputs: LayerInputs, p: SparqParams) -> AttentionResult | None:
        view = inputs.view
        d, P = view.k_seq.shape[3], view.k_dim.shape[3]
        if not (runs_fit(view.k_seq, d) and runs_fit(view.v_seq, d) and runs_fit(view.k_dim, P)):
            return None
        nbytes = self.bytes_read(inputs.store.config, inputs.csr.host_lens, p)
        return sparq_cpu(q, view.k_seq, view.k_dim, view.v_seq, inputs.value_mean, inputs.csr, nbytes=nbytes,
                         **reference_args(p))

    def select_gpu(self, q: torch.Tensor, inputs: LayerInputs, p: SparqParams) -> Selection:
        csr = inputs.csr
        s1 = sparq_stage1(q, inputs.view.k_dim, csr, p.r, scale=p.scale)
        items = sparq_select(s1, csr, inputs.num_kv_heads, p.k, p.local_window)
        stats = s1.alpha_inputs
        # Without reallocation the attention kernel still sums alpha (recomputed on the rows read): the coverage
        # estimate.
        if p.reallocate:
            return Selection(MODE_ROWS, items, alpha_inputs=stats, launch=TUNING["rows"])
        return Selection(MODE_ROWS, items, coverage_inputs=stats, launch=TUNING["rows"])

    def shard(self, p: SparqParams, held: Sequence[int], totals: Sequence[int], starts: Sequence[int], is_last: bool,
              page_size: int) -> tuple[str, Params] | None:
        # k in proportion to the shard's share of the positions; the local window on the last shard only.
        share = sum(held) / max(sum(totals), 1)
        shortest = min(held)
        window = p.local_window if is_last else 0
        k = max(1, round(p.k * share))
        if window > 0:
            window = min(window, shortest)
            k = max(k, window)
        if k >= shortest:
            return "dense", DenseParams(scale=p.scale)
        return self.name, replace(p, k=k, local_window=window)

    def fit(self, p: SparqParams, shortest: int) -> tuple[str, Params]:
        # k <= S: a sequence shorter than k would read every position anyway; dense is exact and reads no more.
        if shortest < p.k:
            return "dense", DenseParams(scale=p.scale)
        return self.name, p

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        # r = d/8 components score every position (S*r elements, a 1/16 share), the rest of the share is rows.
        r = max(1, head_dim // 8)
        k = min(context, int(context * (share - r / (2 * head_dim))))
        if k < 1:
            return None
        return SparqParams(r=r, k=k, local_window=k // 4)

    def from_flags(self, values: dict) -> dict:
        if values.get("local_window") is None and isinstance(values.get("k"), int):
            values["local_window"] = values["k"] // 4  # l = k/4, the paper's setting
        return values


SPARQ = Sparq()
