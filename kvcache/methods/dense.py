"""Dense decode attention over every cached position: the exact baseline (docs/sparse-attention.md §4 for its merge).

On a CPU store the whole path is ATen's CPU flash attention over the pool's pages where they lie, in the store's
dtype (run_cpu): the reference gathers K and V and widens them to float32 first. `kvcache bench dense-cpu` times the
two in turn (bench/results/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvcache.config import KVCacheConfig
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_DENSE
from kvcache.methods.base import AttentionMethod, Params, Selection, scale_of
from kvcache.methods.coverage import full_coverage
from kvcache.methods.gather import gather_sequence
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def dense_bytes(lens: Sequence[int], num_kv_heads: int, d: int, itemsize: int) -> int:
    """Every cached K and V row: 2*S*d elements per kv head."""
    return sum(2 * S * d * itemsize * num_kv_heads for S in lens)


def attend_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of grouped queries q [Hkv, G, d] over k, v [Hkv, S, d] -> out [Hkv, G, d] f32, lse [Hkv, G].

    `mask` [Hkv, S] (bool), if given, keeps only the rows where it is True.
    """
    logits = torch.einsum("hgd,hsd->hgs", q.float(), k.float()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    return torch.einsum("hgs,hsd->hgd", probs, v.float()), lse


def dense(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over every cached position; reads 2*S*d elements per kv head."""
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b in range(B):
        k = gather_sequence(k_seq, csr, b)
        v = gather_sequence(v_seq, csr, b)
        o, s = attend_rows(q[b].view(Hkv, Hq // Hkv, d), k, v, scale)
        out[b], lse[b] = o.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return AttentionResult(out, lse, dense_bytes(csr.host_lens, Hkv, d, k_seq.element_size()),
                           coverage=full_coverage(q))


def page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """(first page id, number of pages) of each run of consecutive ids in `pages`, in order."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def dense_cpu(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] (CPU) over every cached position: out [B, Hq, d] in q's dtype, lse [B, Hq]."""
    B, Hq, d = q.shape
    Hkv, P = k_seq.shape[1], k_seq.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32)
    for b in range(B):
        S = csr.host_lens[b]
        pages = csr.pages_of(b).tolist()
        full, fill = divmod(S, P)
        # The pool is read where it lies: each run of consecutive pages [n, Hkv, P, d] is a batch of n pages for
        # the flash kernel, a GQA group's G query heads its G query positions; the pages' partial outputs are then
        # merged by their lse (docs/sparse-attention.md §4). Gathering the rows into [Hkv, S, d] first took two
        # copies, five times the kernel's own time at 8K.
        chunks = [(k_seq[a : a + n], v_seq[a : a + n]) for a, n in page_runs(pages[:full])]
        if fill:
            chunks.append((k_seq[pages[full], None, :, :fill], v_seq[pages[full], None, :, :fill]))
        if not chunks:
            out[b], lse[b] = 0, float("-inf")
            continue
        qb = q[b].view(1, Hkv, G, d)
        parts = [_FLASH_CPU(qb.expand(k.shape[0], -1, -1, -1), k, v, 0.0, False, scale=scale) for k, v in chunks]
        o = torch.cat([o for o, _ in parts]) if len(parts) > 1 else parts[0][0]  # [n, Hkv, G, d]
        s = torch.cat([s for _, s in parts]) if len(parts) > 1 else parts[0][1]  # [n, Hkv, G]
        total = torch.logsumexp(s, dim=0)
        weights = torch.exp(s - total)
        out[b] = torch.einsum("nhg,nhgd->hgd", weights, o.float()).reshape(Hq, d).to(q.dtype)
        lse[b] = total.reshape(Hq)
    return AttentionResult(out, lse, dense_bytes(csr.host_lens, Hkv, d, k_seq.element_size()))


@dataclass(frozen=True, kw_only=True)
class DenseParams(Params):
    """Dense takes only the softmax scale."""


class Dense(AttentionMethod):
    """Every cached position, exactly."""

    name = "dense"
    Params = DenseParams
    doc = "exact attention over every cached position"

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: Params) -> int:
        return dense_bytes(lens, config.num_kv_heads, config.head_dim, config.itemsize)

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> AttentionResult:
        view = inputs.view
        return dense(q, view.k_seq, view.v_seq, inputs.csr, p.scale)

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> Selection:
        return Selection(MODE_DENSE)

    def run_cpu(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> AttentionResult | None:
        view = inputs.view
        return replace(dense_cpu(q, view.k_seq, view.v_seq, inputs.csr, scale_of(p, q.shape[-1])),
                       coverage=full_coverage(q))

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        return DenseParams() if share >= 1 else None


DENSE = Dense()
