"""The learned page gate's model (docs/sparse-attention.md §3): its weights, the pooled page keys, RoPE at block
positions,
page scores and the choice of pages by token budget or threshold; shared by the gate method, its training, its
key cache and the gate prefill.

Per layer and kv head (one GQA group of G query heads):
    query side  qg = RoPE(W_q [q_1 .. q_G] + b_q, page(q))      G*d -> dg  (the group picks one set of pages)
    key side    kg = RoPE(W_k [max, min, mean](page), page)      3*d -> dg  (of the page's keys: the store's
                                                                           summaries, or rotated back, below)
    scores      softmax_pages(qg . kg / sqrt(dg))
RoPE: the store's keys (and the decode query) are already rotated by the model at their token
positions. A pre-RoPE gate (`GateShape.model_rope_base` > 0, what `kvcache train-gate` makes) first
rotates q and every key back to position 0 with the model's RoPE, as SeerAttention's AttnGate takes
the model's q and k before RoPE: the pooled [max, min, mean] is then of unrotated keys, and the
gate's layers see nothing of where a page sits. A gate with model_rope_base 0 takes the store's
rotated q and page summaries as they are; trained on 4K windows it meets rotations at 8K it never
saw (docs/methods.md, the gate's figures). Either way, as in docs/sparse-attention.md §3, the gate rotates its own
dg-dimensional vectors at block positions: a key vector at its page index, the query at the index
of the page it sits in (the last page at decode), so the gate sees the distance in pages between
query and page. Its base is `GateShape.rope_base`; both are saved with the weights.

The first page (attention sink) and the last, partly filled page are always read; the gate ranks
the pages between them, and a threshold applies to the scores renormalised over those pages
(the distribution training fits, engine/train_gate.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from kvcache.kernels.csr import SUMMARY_MAX, SUMMARY_MEAN, SUMMARY_MIN
from kvcache.kernels.gate_keys import rope_inverse_frequencies

GATE_DIM = 128


@dataclass(frozen=True)
class GateShape:
    """What a gate is for: the model's layers, kv heads, group size and head dim, the store's page size."""

    num_layers: int
    num_kv_heads: int
    group: int  # query heads per kv head (G)
    head_dim: int
    page_size: int
    gate_dim: int = GATE_DIM
    rope_base: float = 10000.0
    model_rope_base: float = 0.0  # the model's RoPE base: q and keys are rotated back to position 0 first (0: not)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def pre_rope(self) -> bool:
        """Whether the gate takes q and keys rotated back to position 0 (and so needs the keys, not the summaries)."""
        return self.model_rope_base > 0


class PageGate(nn.Module):
    """Gate weights of every layer: q side [L, Hkv, G*d, dg] (+ bias), k side [L, Hkv, 3d, dg]."""

    def __init__(self, shape: GateShape, seed: int = 0) -> None:
        super().__init__()
        self.shape = shape
        L, H, G, d, dg = shape.num_layers, shape.num_kv_heads, shape.group, shape.head_dim, shape.gate_dim
        gen = torch.Generator().manual_seed(seed)
        self.q_weight = nn.Parameter(torch.randn((L, H, G * d, dg), generator=gen) / math.sqrt(G * d))
        self.q_bias = nn.Parameter(torch.zeros((L, H, dg)))
        self.k_weight = nn.Parameter(torch.randn((L, H, 3 * d, dg), generator=gen) / math.sqrt(3 * d))

    def layer(self, layer: int) -> LayerGate:
        """The weights of one layer, as the attention method takes them."""
        return LayerGate(self.shape, self.q_weight[layer], self.q_bias[layer], self.k_weight[layer])


@dataclass(frozen=True)
class LayerGate:
    """One layer's gate: q_weight [Hkv, G*d, dg], q_bias [Hkv, dg], k_weight [Hkv, 3d, dg].

    `keys`, when the store keeps them (kvcache.methods.gate_store.GateKeyCache), is that layer's gate key
    of every page id [N, Hkv, dg] (the KV dtype or float32): the fast path scores against it; the
    reference below recomputes the keys from the summaries and ignores it.
    """

    shape: GateShape
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    keys: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> LayerGate:
        keys = None if self.keys is None else self.keys.to(device)
        return LayerGate(self.shape, self.q_weight.to(device), self.q_bias.to(device), self.k_weight.to(device), keys)

    def with_keys(self, keys: torch.Tensor | None) -> LayerGate:
        """The same weights with the store's cached gate keys [N, Hkv, dg] of this layer."""
        return replace(self, keys=keys)

    def key_itemsize(self, kv_itemsize: int) -> int:
        """Bytes per element of the gate keys scoring reads: the cache's dtype, else the KV dtype (the default)."""
        return kv_itemsize if self.keys is None else self.keys.element_size()


def gate_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate x [..., dg] at integer `positions` (broadcast against x[..., 0]) in the half-split layout."""
    dg = x.shape[-1]
    inv_freq = rope_inverse_frequencies(dg, base, x.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., dg/2]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    half = dg // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def unrotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [..., d] as the model rotated it at `positions` (broadcast against x[..., 0]), rotated back to position 0."""
    return gate_rope(x.float(), -positions, base)


def page_summaries(rows: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Min, max and mean of pages' rows [n, Hkv, P, d] over their first rows (held [n, P] bool, at least one)
    -> [n, Hkv, 3, d] float32, laid out as the store's page summaries (kvcache.store.page_pool)."""
    k = rows.float()
    mask = held[:, None, :, None]
    out = torch.empty((*k.shape[:2], 3, k.shape[3]), dtype=torch.float32, device=k.device)
    out[:, :, SUMMARY_MAX] = k.masked_fill(~mask, float("-inf")).amax(2)
    out[:, :, SUMMARY_MIN] = k.masked_fill(~mask, float("inf")).amin(2)
    out[:, :, SUMMARY_MEAN] = k.masked_fill(~mask, 0.0).sum(2) / mask.sum(2).clamp_min(1)
    return out


def block_summaries(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """page_summaries of keys [Hkv, S, d] over aligned blocks of block_size (the last one partial) -> [n, Hkv, 3, d]."""
    Hkv, S, d = keys.shape
    n = -(-S // block_size)
    k = torch.nn.functional.pad(keys, (0, 0, 0, n * block_size - S)).view(Hkv, n, block_size, d).transpose(0, 1)
    return page_summaries(k, (torch.arange(n * block_size, device=keys.device) < S).view(n, block_size))


def pooled_keys(summary: torch.Tensor) -> torch.Tensor:
    """[max, min, mean] of each page's keys, concatenated: summary [n, Hkv, 3, d] -> [n, Hkv, 3d] float32."""
    s = summary.float()
    return torch.cat((s[:, :, SUMMARY_MAX], s[:, :, SUMMARY_MIN], s[:, :, SUMMARY_MEAN]), dim=-1)


def gate_pooled(g: LayerGate, summary: torch.Tensor | None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """The key side's input [n, Hkv, 3d] of a sequence's pages: its page summaries [n, Hkv, 3, d] for a gate on rotated
    vectors; for a pre-RoPE gate, its keys [Hkv, S, d] (positions 0..S-1) rotated back and pooled per page."""
    if not g.shape.pre_rope:
        return pooled_keys(summary if summary is not None else block_summaries(keys, g.shape.page_size))
    if keys is None:
        raise ValueError("a pre-RoPE gate pools the pages' keys rotated back, not the store's summaries of them")
    back = unrotate(keys, torch.arange(keys.shape[1], device=keys.device), g.shape.model_rope_base)
    return pooled_keys(block_summaries(back, g.shape.page_size))


def gate_queries(g: LayerGate, q: torch.Tensor, q_page: torch.Tensor,
                 q_position: torch.Tensor | None = None) -> torch.Tensor:
    """Gate queries of q [..., Hkv, G, d] sitting in pages q_page [...] (at token positions q_position [...], which a
    pre-RoPE gate rotates them back from) -> [..., Hkv, dg]."""
    if g.shape.pre_rope:
        q = unrotate(q, torch.as_tensor(q_position, device=q.device)[..., None, None], g.shape.model_rope_base)
    return project_queries(g, q, q_page)


def project_queries(g: LayerGate, q: torch.Tensor, q_page: torch.Tensor) -> torch.Tensor:
    """Gate queries of q [..., Hkv, G, d] as the gate takes them (rotated back for a pre-RoPE gate), in pages
    q_page [...] -> [..., Hkv, dg]: the group's heads through the query layer, at the page's index."""
    flat = q.float().flatten(-2)  # [..., Hkv, G*d]
    qg = torch.einsum("...hi,hio->...ho", flat, g.q_weight.float()) + g.q_bias.float()
    return gate_rope(qg, q_page[..., None], g.shape.rope_base)


def gate_keys(g: LayerGate, pooled: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Gate keys of pooled [n, Hkv, 3d] at page indexes `positions` [n] (default 0..n-1) -> [n, Hkv, dg] float32."""
    kg = torch.einsum("nhi,hio->nho", pooled.float(), g.k_weight.float())
    if positions is None:
        positions = torch.arange(pooled.shape[0], device=pooled.device)
    return gate_rope(kg, positions.to(pooled.device)[:, None], g.shape.rope_base)


def gate_logits(g: LayerGate, q: torch.Tensor, summary: torch.Tensor | None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
    """Gate logits of a decode query q [Hkv, G, d] (at the sequence's last position) over its pages -> [Hkv, n]: from
    their summaries [n, Hkv, 3, d], or for a pre-RoPE gate from its keys [Hkv, S, d] (gate_pooled)."""
    pooled = gate_pooled(g, summary, keys)  # [n, Hkv, 3d]
    n = pooled.shape[0]
    position = None if keys is None else torch.tensor(keys.shape[1] - 1, device=q.device)
    qg = gate_queries(g, q, torch.tensor(n - 1, device=q.device), position)  # [Hkv, dg]
    kg = gate_keys(g, pooled)  # [n, Hkv, dg]
    return torch.einsum("hd,nhd->hn", qg, kg) / math.sqrt(g.shape.gate_dim)


def gate_page_scores(g: LayerGate, q: torch.Tensor, summary: torch.Tensor | None,
                     keys: torch.Tensor | None = None) -> torch.Tensor:
    """§3 block scores softmax(Qg Kg^T / sqrt(dg)) of q [Hkv, G, d] over its pages (as gate_logits) -> [Hkv, n]."""
    return torch.softmax(gate_logits(g, q, summary, keys), dim=-1)


def gate_select(scores: torch.Tensor, page_size: int, budget: int | None = None,
                threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen page indexes per kv head from scores [Hkv, n]: (chosen [Hkv, t] int64, count [Hkv]).

    Pages 0 and n-1 always; of the pages between, those whose score renormalised over them is at
    least `threshold` (all, without one), best first, as many as fit `budget` tokens (whole pages,
    the first and last included; every page without one). Row h is [0, n-1, best...]; its entries
    past count[h] are padding (they repeat page n-1) and are not read.
    """
    H, n = scores.shape
    dev = scores.device
    if n <= 2:
        chosen = torch.arange(n, device=dev).expand(H, n)
        return chosen.contiguous(), torch.full((H,), n, device=dev, dtype=torch.long)
    middle = scores[:, 1 : n - 1]
    keep = n - 2 if budget is None else min(n - 2, max(0, -(-budget // page_size) - 2))
    order = torch.sort(middle, dim=-1, descending=True, stable=True)
    best = order.indices[:, :keep] + 1  # [H, keep]
    count = torch.full((H,), keep, device=dev, dtype=torch.long)
    if threshold is not None:
        prob = order.values[:, :keep] / middle.sum(-1, keepdim=True).clamp_min(1e-30)
        count = (prob >= threshold).sum(-1)  # sorted: the ones above come first
    slots = torch.arange(keep, device=dev)[None, :]
    last = torch.full((H, 1), n - 1, device=dev, dtype=torch.long)
    best = torch.where(slots < count[:, None], best, last)
    chosen = torch.cat((torch.zeros_like(last), last, best), dim=-1)
    return chosen, count + 2


def gate_select_rows(logits: torch.Tensor, pages: torch.Tensor, page_size: int, budget: int | None = None,
                     threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_select of many rows at once, without a host sync: row r holds the logits [R, M] of its first pages[r]
    pages (the rest are ignored); -> (chosen [R, 2 + keep] int64, count [R]), row by row as gate_select gives them
    (entries past count repeat the row's last page)."""
    M = logits.shape[1]
    dev = logits.device
    n = pages.to(dev, torch.long)
    width = max(0, M - 2) if budget is None else min(max(0, M - 2), max(0, -(-budget // page_size) - 2))
    # Softmax over the pages between the first and the last only: the scores renormalised over them. Columns
    # past a row's pages get 0 and sort after its own (stable sort); a row without pages between is NaN, kept by
    # neither budget nor threshold.
    past = torch.arange(1, M, device=dev)[None, :] >= (n - 1)[:, None]
    between = torch.softmax(logits[:, 1:].float().masked_fill(past, float("-inf")), dim=-1)
    values, indices = torch.sort(between, dim=-1, descending=True, stable=True)
    count = (n - 2).clamp(0, width)
    if threshold is not None:
        count = torch.minimum(count, (values >= threshold).sum(-1))  # sorted: the ones above come first
    last = (n - 1).clamp_min(0)[:, None]
    best = torch.where(torch.arange(width, device=dev)[None, :] < count[:, None], indices[:, :width] + 1, last)
    chosen = torch.cat((torch.zeros_like(last), last, best), dim=-1)
    return chosen, torch.where(n <= 2, n, count + 2)
