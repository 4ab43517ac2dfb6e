"""Quest page selection (docs/sparse-attention.md §5): page scores from the key summaries, exact attention over the
chosen pages; the torch reference, the selection on the device, and the Triton selection."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.kernels.csr import SUMMARY_MAX, SUMMARY_MIN, PageTableCSR
from kvcache.kernels.paged_decode import MODE_PAGES
from kvcache.kernels.quest import quest_select_scored
from kvcache.methods.base import REQUIRED, AttentionMethod, Params, Selection, param, scale_of
from kvcache.methods.coverage import chosen_mass, reference_args
from kvcache.methods.dense import DenseParams, attend_rows
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult

SUMMARY_ROWS_READ = 2  # Quest reads min and max; the mean is for learned gates


def quest_bytes(lens: Sequence[int], page_size: int, top_pages: int, num_kv_heads: int, d: int, itemsize: int) -> int:
    """Per kv head: min and max summaries (float32) of every page, then the filled rows of the chosen pages."""
    total = 0
    for S in lens:
        n = -(-S // page_size)
        t = min(top_pages, n)
        # The last (possibly partial) page is always among the chosen.
        rows = S if t == n else (t - 1) * page_size + (S - (n - 1) * page_size)
        summaries = n * SUMMARY_ROWS_READ * d * SUMMARY_DTYPE.itemsize
        total += (summaries + 2 * rows * d * itemsize) * num_kv_heads
    return total


def quest_pages_for_share(context: int, page_size: int, share: float, d: int, itemsize: int) -> int:
    """Pages a Quest choice may read so that quest_bytes comes to `share` of dense's 2*d*itemsize bytes per
    position, at least 2: pages = S/P * (share - 2*d*4 / (2*P*d*itemsize)), the float32 min/max of every page
    read first."""
    scoring = SUMMARY_ROWS_READ * d * SUMMARY_DTYPE.itemsize / (2 * page_size * d * itemsize)
    return max(2, int(context * (share - scoring)) // page_size)


def quest_head_logits(q: torch.Tensor, summary: torch.Tensor, scale: float) -> torch.Tensor:
    """§5 step 1 at the attention scale: scale * bound_g(p) of q [Hkv, G, d] over summary [n, Hkv, 3, d] ->
    [Hkv, G, n] float32, where bound_g(p) = sum_j max(q_j * max_j, q_j * min_j) bounds q.k over page p's keys."""
    kmin = summary[:, :, SUMMARY_MIN].float().transpose(0, 1)  # [Hkv, n, d]
    kmax = summary[:, :, SUMMARY_MAX].float().transpose(0, 1)
    qf = q.float()[:, :, None, :]  # [Hkv, G, 1, d]
    return torch.maximum(qf * kmax[:, None], qf * kmin[:, None]).sum(-1) * scale


def quest_page_scores(q: torch.Tensor, summary: torch.Tensor, scale: float) -> torch.Tensor:
    """Page scores of a GQA group: q [Hkv, G, d], summary [n, Hkv, 3, d] -> [Hkv, n].

    §5: each head's bound on q.k over a page is sum_j max(q_j * max_j, q_j * min_j). A group
    reads one set of pages, so, as SparQ sums shat over the group (§1), each head's bounds are
    softmaxed over pages (at the attention scale) and summed: every head gets an equal vote. On
    the demo's data this covers more of every head's attention mass than the max or the sum of
    raw bounds, which let one head's large logits outvote the others.
    """
    return torch.softmax(quest_head_logits(q, summary, scale), dim=-1).sum(dim=1)


def quest_choose(q: torch.Tensor, summary: torch.Tensor, scale: float, top_pages: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """One sequence's choice: page indexes [Hkv, t] (select_pages) and each query head's coverage estimate
    [Hkv, G], the share of the softmax of its bounds over all pages that the chosen pages hold (a heuristic: the
    bounds overstate q.k, most on pages whose keys spread widely)."""
    logits = quest_head_logits(q, summary, scale)
    chosen = select_pages(torch.softmax(logits, dim=-1).sum(dim=1), top_pages)
    return chosen, chosen_mass(logits, chosen)


def select_pages(scores: torch.Tensor, top_pages: int) -> torch.Tensor:
    """Indices of the chosen pages per kv head [Hkv, min(top_pages, n)]: the last page plus the best others."""
    n = scores.shape[-1]
    if top_pages >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n)
    best = torch.topk(scores[:, : n - 1], top_pages - 1, dim=-1).indices
    last = torch.full((scores.shape[0], 1), n - 1, device=scores.device, dtype=best.dtype)
    return torch.cat((best, last), dim=-1)


def check_quest_params(top_pages: int) -> None:
    """Raise InvalidParameter unless top_pages is a positive int."""
    if not isinstance(top_pages, int) or isinstance(top_pages, bool) or top_pages < 1:
        raise InvalidParameter(f"quest: top_pages={top_pages!r} must be a positive int")


def quest(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    k_summary: torch.Tensor,
    csr: PageTableCSR,
    top_pages: int,
    scale: float | None = None,
) -> AttentionResult:
    """Exact attention of q [B, Hq, d] over the `top_pages` pages with the highest Quest bound (last page always)."""
    check_quest_params(top_pages)
    B, Hq, d = q.shape
    Hkv = k_seq.shape[1]
    P = csr.page_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    coverage = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b, S in enumerate(csr.host_lens):
        qg = q[b].view(Hkv, Hq // Hkv, d)
        pages = csr.pages_of(b)
        chosen, mass = quest_choose(qg, k_summary[pages], scale, top_pages)  # [Hkv, t], [Hkv, G]
        coverage[b] = mass.reshape(Hq).clamp(0.0, 1.0)
        # Rows of the chosen pages only; rows past S (in the last page) are masked out.
        page_ids = pages[chosen]  # [Hkv, t]
        heads = torch.arange(Hkv, device=q.device)[:, None]
        k_rows = k_seq[page_ids, heads].flatten(1, 2)  # [Hkv, t*P, d]
        v_rows = v_seq[page_ids, heads].flatten(1, 2)
        positions = (chosen[..., None] * P + torch.arange(P, device=q.device)).flatten(1)  # [Hkv, t*P]
        valid = positions < S
        y, s = attend_rows(qg, k_rows, v_rows, scale, mask=valid)
        out[b], lse[b] = y.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return AttentionResult(out, lse, quest_bytes(csr.host_lens, P, top_pages, Hkv, d, k_seq.element_size()),
                           coverage=coverage)


@dataclass(frozen=True, kw_only=True)
class QuestParams(Params):
    """Quest's parameters (docs/sparse-attention.md §5)."""

    top_pages: int = param(REQUIRED, doc="pages read per kv head, the last page included", lo=1, cli=16)


class Quest(AttentionMethod):
    """Pages scored by the bound of q.k over their key summaries; exact attention over the best top_pages."""

    name = "quest"
    Params = QuestParams
    doc = "Quest: pages scored from their key min/max, exact attention over the best top_pages"

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: QuestParams) -> int:
        return quest_bytes(lens, config.page_size, p.top_pages, config.num_kv_heads, config.head_dim,
                           config.itemsize)

    def work_bytes(self, config: KVCacheConfig, lens: Sequence[int], q_heads: int, p: QuestParams) -> int:
        # The torch bound multiplies each query head with every page's min and max: [Hq, pages, d] float32, thrice.
        pages = config.pages_for(max(lens))
        return super().work_bytes(config, lens, q_heads, p) + 3 * q_heads * pages * config.head_dim * 4

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: QuestParams) -> AttentionResult:
        view = inputs.view
        return quest(q, view.k_seq, view.v_seq, view.k_summary, inputs.csr, **reference_args(p))

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: QuestParams) -> Selection:
        B, Hq, d = q.shape
        Hkv = inputs.num_kv_heads
        csr = inputs.csr
        scale = scale_of(p, d)
        width = min(p.top_pages, max(-(-S // csr.page_size) for S in csr.host_lens))
        items = torch.zeros((B * Hkv, width), dtype=torch.long, device=q.device)
        count = torch.empty((B * Hkv,), dtype=torch.int32, device=q.device)
        mass = torch.empty((B * Hkv, Hq // Hkv), dtype=torch.float32, device=q.device)
        for b in range(B):
            pages = csr.pages_of(b)
            rows = slice(b * Hkv, (b + 1) * Hkv)
            chosen, mass[rows] = quest_choose(q[b].view(Hkv, Hq // Hkv, d), inputs.view.k_summary[pages], scale,
                                              p.top_pages)  # [Hkv, t], [Hkv, G]
            items[rows, : chosen.shape[1]] = chosen
            count[rows] = chosen.shape[1]
        return Selection(MODE_PAGES, items, count, estimate=lambda: mass)

    def select_gpu(self, q: torch.Tensor, inputs: LayerInputs, p: QuestParams) -> Selection:
        csr = inputs.csr
        items, count, logits = quest_select_scored(q, inputs.view.k_summary, csr, p.top_pages, p.scale)
        pages = csr.page_counts().repeat_interleave(inputs.num_kv_heads)
        return Selection(MODE_PAGES, items, count, estimate=lambda: chosen_mass(logits, items, count, pages))

    def shard(self, p: QuestParams, held: Sequence[int], totals: Sequence[int], starts: Sequence[int], is_last: bool,
              page_size: int) -> tuple[str, Params] | None:
        # top_pages in proportion to the shard's share of the pages; dense when that covers the longest row.
        pages = sum(math.ceil(n / page_size) for n in held)
        all_pages = sum(math.ceil(n / page_size) for n in totals)
        top = max(1, math.ceil(p.top_pages * pages / max(all_pages, 1)))
        if top >= math.ceil(max(held) / page_size):
            return "dense", DenseParams(scale=p.scale)
        return self.name, replace(p, top_pages=top)

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        return QuestParams(top_pages=quest_pages_for_share(context, page_size, share, head_dim, itemsize))


QUEST = Quest()
