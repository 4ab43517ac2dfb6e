"""SeerAttention's gate in prefill (docs/sparse-attention.md §3): the key blocks each query block of a chunk reads,
chosen by
the learned page gate, as a block-sparse index for the prefill kernel (kernels/sparse_prefill.py).

Blocks are the gate's pages (its page size), aligned to absolute positions as in
kvcache.prefill.minference_index. For query block M of the chunk:
    query side  the block's queries mean-pooled per head (§3: "pool Q over blocks ... average"), the G heads of a
                GQA group concatenated and projected to one gate query at block index M (as at decode)
    key side    [max, min, mean] of each key block's keys (the store's page summaries) through the gate's key layer
                at its block index
    choice      blocks 0 (attention sink) and M (the diagonal) always; of the blocks between, the best by gate
                score as at decode (kvcache.methods.gate.gate_select: token budget, probability threshold renormalised
                over those blocks, or both), ties in block order.
A group's G heads share the choice: they read the same K/V rows. A pre-RoPE gate (kvcache.methods.gate) rotates
each query and key back to position 0 before pooling.
"""

from __future__ import annotations

import math

import torch

from kvcache.methods.gate import check_gate_params
from kvcache.methods.gate_model import LayerGate, gate_keys, gate_pooled, project_queries, unrotate
from kvcache.prefill.minference_index import SparseIndex, _block_means, _check_chunk, _index, _query_blocks, chunk_keys
from kvcache.store.page_table import PageTableCSR


def gate_block_logits(q: torch.Tensor, keys: torch.Tensor, start: int, layer_gate: LayerGate) -> torch.Tensor:
    """Gate logits [Hkv, nq, nkb] of the chunk q [T, Hq, d] at `start` over the key blocks of keys [Hkv, start+T, d]
    (every block up to the chunk's last; blocks past a query block's own are not masked here)."""
    T, Hq, d = q.shape
    Hkv = keys.shape[0]
    P = layer_gate.shape.page_size
    M = _query_blocks(start, T, P, q.device)
    if layer_gate.shape.pre_rope:  # each query rotated back from its own position before the block's mean
        q = unrotate(q, torch.arange(start, start + T, device=q.device)[:, None], layer_gate.shape.model_rope_base)
    q_bar = _block_means(q.permute(1, 0, 2), start - int(M[0]) * P, M.numel(), P)  # [Hq, nq, d]
    grouped = q_bar.view(Hkv, Hq // Hkv, M.numel(), d).permute(2, 0, 1, 3)  # [nq, Hkv, G, d]
    qg = project_queries(layer_gate, grouped, M)  # [nq, Hkv, dg]
    kg = gate_keys(layer_gate, gate_pooled(layer_gate, None, keys))  # [nkb, Hkv, dg]
    return torch.einsum("mhd,nhd->hmn", qg, kg) / math.sqrt(layer_gate.shape.gate_dim)


def select_blocks(logits: torch.Tensor, M: torch.Tensor, block_size: int, budget: int | None,
                  threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen key blocks per (kv head, query block) from logits [H, nq, nkb]: (ids [H, nq, w] ascending, -1 padded;
    count [H, nq]). Blocks 0 and M always; of 1 .. M-1 the best as kvcache.methods.gate.gate_select ranks them."""
    H, nq, nkb = logits.shape
    dev = logits.device
    ids = torch.arange(nkb, device=dev)
    middle = (ids[None, :] >= 1) & (ids[None, :] < M[:, None])  # [nq, nkb]
    masked = logits.float().masked_fill(~middle, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True)
    take = middle.sum(-1).expand(H, nq)  # [H, nq]
    if budget is not None:
        take = take.clamp(max=max(0, -(-budget // block_size) - 2))
    if threshold is not None:
        # The softmax over the blocks between, as decode renormalises the gate's scores over its middle pages.
        prob = torch.softmax(order.values, dim=-1).nan_to_num(0.0)  # a row with no middle block is all -inf
        take = torch.minimum(take, (prob >= threshold).sum(-1))
    chosen = torch.zeros((H, nq, nkb), dtype=torch.bool, device=dev)
    chosen.scatter_(-1, order.indices, ids[None, None, :] < take[..., None])  # ids double as ranks in the order
    chosen |= (ids[None, :] == 0) | (ids[None, :] == M[:, None])
    count = chosen.sum(-1)
    ascending = torch.where(chosen, ids, nkb).sort(dim=-1).values[..., : int(count.max())]
    return torch.where(ascending < nkb, ascending, -1), count


def gate_block_index(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    csr: PageTableCSR,
    start: int,
    layer_gate: LayerGate,
    *,
    budget: int | None = None,
    threshold: float | None = None,
    b: int = 0,
) -> SparseIndex:
    """§3 prefill index of the chunk q [T, Hq, d] at `start` of sequence b: per query block, the key blocks (pages of
    the gate's page size) the gate picks within `budget` tokens and/or above `threshold`; blocks 0 and the query
    block's own always."""
    check_gate_params(budget, threshold)
    P = layer_gate.shape.page_size
    T, Hq, _ = _check_chunk(q, start, P)
    keys = chunk_keys(k_seq, csr, start, q, b)  # [Hkv, S, d]
    Hkv = keys.shape[0]
    M = _query_blocks(start, T, P, q.device)
    ids, count = select_blocks(gate_block_logits(q, keys, start, layer_gate), M, P, budget, threshold)
    G = Hq // Hkv
    return _index(P, start, T, ids.repeat_interleave(G, dim=0), count.repeat_interleave(G, dim=0))
