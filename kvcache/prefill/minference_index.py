"""MInference sparse-prefill indices (docs/sparse-attention.md §2): A-shape, vertical-slash and block-sparse.

Every builder returns a `SparseIndex` for one query chunk q [T, Hq, d] at absolute positions
[start, start + T) of one sequence, whose keys (all cached positions up to start + T) are read
from the store through its page table.

Blocks are aligned to absolute positions, not to the chunk: key block n holds positions
[n*B, (n+1)*B), and query block M holds the chunk's queries at [M*B, (M+1)*B) ∩ [start, start+T).
So a chunk starting mid-block has a partial first query block, and a query block's own block
(n == M) is the only key block that straddles the causal diagonal: kernels mask only there.

Indices are per query head, as in the authors' code: each head has its own pattern and sizes
(chosen offline, §2), and its own columns, diagonals or top blocks. A GQA group shares its K/V
rows, not its index: the kernel reads a group's K/V once per head, running the group's heads
side by side so that the repeats mostly hit L2.
"""

from __future__ import annotations

import math

import torch

from kvcache.errors import InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.kernels.block_index import SparseIndex
from kvcache.methods.gather import gather_sequence
from kvcache.store.page_table import PageTableCSR

# §2, the authors' defaults.
BLOCK_SIZE = 64
LAST_Q = 64  # vertical-slash estimates columns and diagonals from the chunk's last 64 queries
FIRST_COLUMNS = 30  # always-kept leading columns (attention sinks)
LAST_DIAGONALS = 100  # always-kept diagonals nearest the main one (offsets 0..99: the local band)
MIN_COLUMNS = 30  # at least this many columns ...
MIN_DIAGONALS = 50  # ... and diagonals, whatever n_vertical and n_slash ask




# ---- shared pieces ---------------------------------------------------------------------------------


def _query_blocks(start: int, num_queries: int, block_size: int, device) -> torch.Tensor:
    """Absolute query blocks of the chunk, ascending [nq] (int64)."""
    first = start // block_size
    last = (start + num_queries - 1) // block_size
    return torch.arange(first, last + 1, device=device)


def _check_chunk(q: torch.Tensor, start: int, block_size: int) -> tuple[int, int, int]:
    """(T, Hq, d) of a query chunk after checking its shape, start and the block size."""
    if q.dim() != 3 or q.shape[0] < 1:
        raise ShapeMismatch(f"q has shape {tuple(q.shape)}; expected a chunk [T >= 1, Hq, d]")
    if not isinstance(start, int) or start < 0:
        raise PositionOutOfRange(f"start must be a non-negative int, got {start!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise InvalidParameter(f"block_size must be a positive int, got {block_size!r}")
    return q.shape[0], q.shape[1], q.shape[2]


def chunk_keys(k_seq: torch.Tensor, csr: PageTableCSR, start: int, q: torch.Tensor, b: int = 0) -> torch.Tensor:
    """Keys the chunk q [T, Hq, d] at `start` may attend to, read through the page table -> [Hkv, start+T, d]."""
    T, Hq, d = q.shape
    S = start + T
    if csr.host_lens[b] < S:
        raise PositionOutOfRange(f"the chunk ends at position {S}, but sequence {b} holds {csr.host_lens[b]} "
                                 "positions; append the chunk's K/V before building its index")
    Hkv = k_seq.shape[1]
    if Hq % Hkv or k_seq.shape[3] != d:
        raise ShapeMismatch(f"q has {Hq} heads of dim {d}; the store has {Hkv} kv heads of dim {k_seq.shape[3]}")
    return gather_sequence(k_seq, csr, b)[:, :S]


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [t, Hq, d] -> [Hkv, G, t, d]: query heads h = kv_head * G + g, as the store's GQA layout."""
    t, Hq, d = q.shape
    return q.permute(1, 0, 2).reshape(num_kv_heads, Hq // num_kv_heads, t, d)


def _index(block_size, start, T, block_index, block_count, column_index=None, column_count=None) -> SparseIndex:
    H, nq = block_count.shape
    dev = block_count.device
    if column_index is None:
        column_index = torch.empty((H, nq, 0), dtype=torch.int32, device=dev)
        column_count = torch.zeros((H, nq), dtype=torch.int32, device=dev)
    return SparseIndex(block_size, start, T, block_index.to(torch.int32).contiguous(),
                       block_count.to(torch.int32).contiguous(), column_index.to(torch.int32).contiguous(),
                       column_count.to(torch.int32).contiguous())


# ---- causal (every block): dense attention through the sparse kernels ---------------------------------


def causal_index(q: torch.Tensor, start: int, *, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """Every causal key block for every query block: with it, sparse prefill is dense causal attention."""
    T, Hq, _ = _check_chunk(q, start, block_size)
    M = _query_blocks(start, T, block_size, q.device)
    ids = torch.arange(int(M[-1]) + 1, device=q.device)
    valid = ids[None, :] <= M[:, None]  # [nq, nkb]
    block_index = torch.where(valid, ids[None, :], -1).expand(Hq, -1, -1)
    return _index(block_size, start, T, block_index, (M + 1).expand(Hq, -1))


# ---- A-shape ------------------------------------------------------------------------------------------


def a_shape_index(
    q: torch.Tensor, start: int, *, n_init: int = 128, n_local: int = 3968, block_size: int = BLOCK_SIZE
) -> SparseIndex:
    """§2 A-shape: every query block lists the blocks of the first n_init keys and of its queries' last n_local keys.

    At block granularity the index covers every key the pattern names: the sink blocks
    [0, ceil(n_init / B)) and the blocks from the one holding (first query - n_local + 1) up to the
    query block's own. The same for every head; only q's shape and device are used.
    """
    T, Hq, _ = _check_chunk(q, start, block_size)
    if n_init < 0 or n_local < 1:
        raise InvalidParameter(f"A-shape needs n_init >= 0 and n_local >= 1, got n_init={n_init}, n_local={n_local}")
    B = block_size
    M = _query_blocks(start, T, B, q.device)
    first_query = torch.clamp(M * B, min=start)
    window_lo = torch.clamp(first_query - n_local + 1, min=0) // B  # first window block of each query block
    sink = torch.clamp(window_lo, max=-(-n_init // B))  # sink blocks before the window
    count = sink + (M - window_lo + 1)
    width = int(count.max())
    i = torch.arange(width, device=q.device)[None, :]
    block = torch.where(i < sink[:, None], i, window_lo[:, None] + i - sink[:, None])
    block_index = torch.where(i < count[:, None], block, -1).expand(Hq, -1, -1)
    return _index(B, start, T, block_index, count.expand(Hq, -1))


# ---- vertical-slash -----------------------------------------------------------------------------------


def vertical_slash_lines(
    q: torch.Tensor,
    keys: torch.Tensor,
    start: int,
    *,
    n_vertical: int = 1000,
    n_slash: int = 6096,
    last_q: int = LAST_Q,
    first_columns: int = FIRST_COLUMNS,
    last_diagonals: int = LAST_DIAGONALS,
    min_columns: int = MIN_COLUMNS,
    min_diagonals: int = MIN_DIAGONALS,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§2 vertical-slash estimate: (columns [Hq, nv] ascending key positions, offsets [Hq, ns] ascending i - j).

    keys [Hkv, start+T, d]. A = softmax(Q[-last_q:] K^T * scale) with a causal mask, per query
    head; a column's score is its sum over those rows, a diagonal's (offset o = i - j) the sum of A
    along it. Keeps the top nv = min(S, max(n_vertical, min_columns)) columns and top
    ns = min(S, max(n_slash, min_diagonals)) diagonals, the first `first_columns` columns and the
    `last_diagonals` diagonals nearest the main one first (earliest and nearest first when the
    counts cannot hold them all).
    """
    T, Hq, d = q.shape
    Hkv, S, _ = keys.shape
    if S != start + T:
        raise ShapeMismatch(f"keys hold {S} positions; the chunk at {start} of {T} queries needs {start + T}")
    if min(n_vertical, n_slash, last_q) < 1 or min(first_columns, last_diagonals, min_columns, min_diagonals) < 0:
        raise InvalidParameter(f"vertical-slash needs n_vertical, n_slash, last_q >= 1, got {n_vertical}, "
                               f"{n_slash}, {last_q}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = min(last_q, T)
    # Scores in the input dtype (tensor cores), softmax in float32, as the authors do.
    logits = torch.matmul(_grouped(q[T - n :], Hkv), keys[:, None].transpose(-1, -2)).float().mul_(scale)
    logits = logits.view(Hq, n, S)
    # Row r is the query at position S - n + r: it sees keys j <= S - n + r.
    future = torch.ones((n, n), dtype=torch.bool, device=q.device).triu(1)
    logits[:, :, S - n :].masked_fill_(future, float("-inf"))
    attn = torch.softmax(logits, dim=-1)  # [Hq, n, S]
    del logits

    vertical = attn.sum(dim=1)  # [Hq, S]
    slash = _diagonal_sums(attn)  # [Hq, S]: slash[:, o] sums A along i - j = o
    del attn
    # Each row of A sums to 1, so every real score is <= n: forced lines score above that, the
    # earliest columns and the nearest diagonals highest.
    _force_leading(vertical, first_columns, n + 1.0)
    _force_leading(slash, last_diagonals, n + 1.0)
    nv = min(S, max(n_vertical, min_columns))
    ns = min(S, max(n_slash, min_diagonals))
    columns = torch.topk(vertical, nv, dim=-1).indices.sort(dim=-1).values
    offsets = torch.topk(slash, ns, dim=-1).indices.sort(dim=-1).values
    return columns, offsets


def _diagonal_sums(attn: torch.Tensor) -> torch.Tensor:
    """attn [H, n, S] of the last n queries (row r at position S - n + r) -> [H, S] sums along i - j = o.

    Counting u = S - 1 - o instead of o, A[r, (S-n+r) - o] = A[r, r + u - (n-1)]: on A padded with
    n - 1 zero columns in front (width W = S + n - 1), that is padded[r, r + u], one strided view
    with row stride W + 1. Entries left of key 0 read the zeros.
    """
    H, n, S = attn.shape
    W = S + n - 1
    padded = torch.nn.functional.pad(attn, (n - 1, 0))  # [H, n, W]
    by_u = padded.as_strided((H, n, S), (n * W, W + 1, 1)).sum(dim=1)
    return by_u.flip(-1)


def _force_leading(scores: torch.Tensor, count: int, floor: float) -> None:
    """Give the first `count` entries of every row scores above `floor`, decreasing along the row."""
    count = min(count, scores.shape[-1])
    if count:
        scores[:, :count] = floor + torch.arange(count, 0, -1, device=scores.device, dtype=scores.dtype)


def vertical_slash_to_index(
    columns: torch.Tensor, offsets: torch.Tensor, start: int, num_queries: int, block_size: int = BLOCK_SIZE
) -> SparseIndex:
    """§2 conversion: per query block, the key blocks the chosen diagonals cross, plus the chosen columns they miss.

    columns [H, nv] key positions, offsets [H, ns] diagonal offsets i - j >= 0. Diagonal o crosses,
    for an aligned query block M, key blocks M - ceil(o/B) .. M - floor(o/B): the same distances
    back from the diagonal block for every query block, so a head's block lists are one set of
    distances shifted per query block. A column is kept for query block M only if it is causal
    (its block <= M) and its block is not already listed.
    """
    B, T = block_size, num_queries
    H = columns.shape[0]
    dev = columns.device
    M = _query_blocks(start, T, B, dev)  # [nq]
    n_kblocks = int(M[-1]) + 1
    # Distances back from the diagonal block, per head [H, nkb].
    near = torch.zeros((H, n_kblocks + 1), dtype=torch.bool, device=dev)
    near.scatter_(1, torch.clamp(offsets // B, max=n_kblocks), True)
    near.scatter_(1, torch.clamp((offsets + B - 1) // B, max=n_kblocks), True)
    near = near[:, :n_kblocks]
    width = int(near.sum(dim=1).max())
    ids = torch.arange(n_kblocks, device=dev)
    dist = torch.where(near, ids, n_kblocks).sort(dim=1).values[:, :width]  # [H, width] ascending, padded
    count = (dist[:, None, :] <= M[None, :, None]).sum(dim=-1)  # [H, nq]
    # The i-th entry of query block M's ascending list is M - dist[count - 1 - i].
    pick = count[..., None] - 1 - torch.arange(width, device=dev)  # [H, nq, width]
    taken = dist[:, None, :].expand(-1, M.numel(), -1).gather(2, pick.clamp(min=0))
    block_index = torch.where(pick >= 0, M[None, :, None] - taken, -1)

    # Columns: causal and not in a listed block.
    back = M[None, :, None] - (columns // B)[:, None, :]  # [H, nq, nv] blocks back from the diagonal
    listed = near.gather(1, back.clamp(0, n_kblocks - 1).reshape(H, -1)).view_as(back)
    keep = (back >= 0) & ~listed
    column_count = keep.sum(dim=-1)
    col_width = int(column_count.max())
    slot = torch.cumsum(keep, dim=-1) - 1
    column_index = torch.full((H, M.numel(), col_width + 1), -1, dtype=torch.int64, device=dev)
    column_index.scatter_(2, torch.where(keep, slot, col_width), columns[:, None, :].expand_as(back))
    return _index(B, start, T, block_index, count, column_index[..., :col_width], column_count)


def vertical_slash_index(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    csr: PageTableCSR,
    start: int,
    *,
    n_vertical: int = 1000,
    n_slash: int = 6096,
    last_q: int = LAST_Q,
    first_columns: int = FIRST_COLUMNS,
    last_diagonals: int = LAST_DIAGONALS,
    min_columns: int = MIN_COLUMNS,
    min_diagonals: int = MIN_DIAGONALS,
    block_size: int = BLOCK_SIZE,
    b: int = 0,
    scale: float | None = None,
) -> SparseIndex:
    """§2 vertical-slash index of the chunk q [T, Hq, d] at `start`, from sequence b's keys in the paged store.

    vertical_slash_lines picks the columns and diagonals; vertical_slash_to_index turns them into lists.
    """
    _check_chunk(q, start, block_size)
    keys = chunk_keys(k_seq, csr, start, q, b)
    columns, offsets = vertical_slash_lines(
        q, keys, start, n_vertical=n_vertical, n_slash=n_slash, last_q=last_q, first_columns=first_columns,
        last_diagonals=last_diagonals, min_columns=min_columns, min_diagonals=min_diagonals, scale=scale,
    )
    return vertical_slash_to_index(columns, offsets, start, q.shape[0], block_size)


# ---- block-sparse -------------------------------------------------------------------------------------


def block_sparse_index(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    csr: PageTableCSR,
    start: int,
    *,
    top_k: int = 100,
    block_size: int = BLOCK_SIZE,
    b: int = 0,
    scale: float | None = None,
) -> SparseIndex:
    """§2 block-sparse index: per query block the top_k key blocks by mean-pooled Q.K, the diagonal and first always in.

    Q is pooled over the chunk's queries of each aligned block, K over the cached keys of each
    block (partial first and last blocks average what they hold). Block scores are masked
    causally (key block <= query block); softmax is monotone along a row, so the top-k of the raw
    scores is that of §2's softmax. top_k counts the two forced blocks.
    """
    T, Hq, d = _check_chunk(q, start, block_size)
    if top_k < 2:
        raise InvalidParameter(f"block-sparse top_k must be >= 2 (the diagonal and first block are always kept), "
                               f"got {top_k}")
    keys = chunk_keys(k_seq, csr, start, q, b)  # [Hkv, S, d]
    Hkv = keys.shape[0]
    B = block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    M = _query_blocks(start, T, B, q.device)
    nq, n_kblocks = M.numel(), int(M[-1]) + 1
    q_bar = _block_means(q.permute(1, 0, 2), start - int(M[0]) * B, nq, B)  # [Hq, nq, d]
    k_bar = _block_means(keys, 0, n_kblocks, B)  # [Hkv, nkb, d]
    scores = torch.matmul(q_bar.view(Hkv, Hq // Hkv, nq, d), k_bar[:, None].transpose(-1, -2))
    scores = scores.view(Hq, nq, n_kblocks).mul_(scale)  # in place: [32, 8192, 8192] floats at 512K
    ids = torch.arange(n_kblocks, device=q.device)
    scores.masked_fill_(ids[None, None, :] > M[None, :, None], float("-inf"))
    forced = (ids[None, :] == M[:, None]) | (ids[None, :] == 0)
    scores.masked_fill_(forced[None], float("inf"))
    k = min(top_k, n_kblocks)
    top = torch.topk(scores, k, dim=-1).indices  # causal blocks first: exactly M + 1 are finite
    count = torch.clamp(M + 1, max=top_k).expand(Hq, -1)
    valid = torch.arange(k, device=q.device)[None, None, :] < count[..., None]
    chosen = torch.where(valid, top, n_kblocks).sort(dim=-1).values
    block_index = torch.where(chosen < n_kblocks, chosen, -1)
    return _index(B, start, T, block_index, count)


def _block_means(x: torch.Tensor, offset: int, num_blocks: int, block_size: int) -> torch.Tensor:
    """Means of x [H, n, d] over aligned blocks, row i at block position offset + i -> [H, num_blocks, d] float32."""
    H, n, d = x.shape
    padded = x.new_zeros((H, num_blocks * block_size, d))  # the input dtype: half the bytes of a float32 copy
    padded[:, offset : offset + n] = x
    sums = padded.view(H, num_blocks, block_size, d).sum(dim=2, dtype=torch.float32)
    rows = torch.zeros(num_blocks * block_size, dtype=torch.float32, device=x.device)
    rows[offset : offset + n] = 1.0
    return sums / rows.view(num_blocks, block_size).sum(dim=1).clamp(min=1.0)[None, :, None]
