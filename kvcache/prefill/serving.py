"""MInference prefill as the KV manager serves it (docs/sparse-attention.md §2): per-head patterns, the index of a
query chunk built from the keys the store holds, and sparse attention restricted to it.

A chunk's heads each have their own pattern (chosen offline by `kvcache search-patterns`); the
builders of kvcache.prefill.minference_index make one pattern for every head, so a layer's index
is assembled from one build per distinct pattern, each head taking its own rows.

    HeadPattern("vertical_slash", n_vertical=100, n_slash=750)
    index = build_index(q, k_seq, csr, start, [pattern_of_head_0, ...])
    out, lse = sparse_attention(q, k_seq, v_seq, csr, index)        # gathered tiles on the CPU, Triton on CUDA

`served_index` / `served_prefill` do the same for a sequence of a KVStore (InProcessClient and the
SparseIndex / SparsePrefill RPCs call them); `paged` lays contiguous K/V [S, Hkv, d] out as pages,
for an engine that holds a prompt's K/V itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvcache.errors import DTypeMismatch, InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.kernels.sparse_prefill import sparse_prefill
from kvcache.prefill.block_sparse_cpu import block_sparse_prefill
from kvcache.prefill.minference import minference_prefill
from kvcache.prefill.minference_index import (
    BLOCK_SIZE,
    SparseIndex,
    a_shape_index,
    block_sparse_index,
    causal_index,
    vertical_slash_index,
)
from kvcache.store.page_table import PageTableCSR

# Pattern name -> the sizes it takes (all required), in the order a label prints them.
PATTERNS: dict[str, tuple[str, ...]] = {
    "a_shape": ("n_init", "n_local"),
    "vertical_slash": ("n_vertical", "n_slash"),
    "block_sparse": ("top_k",),
    "causal": (),
}
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class HeadPattern:
    """One query head's sparse-prefill pattern and its sizes, e.g. HeadPattern("a_shape", n_init=100, n_local=800)."""

    pattern: str
    sizes: tuple[tuple[str, int], ...] = ()

    def __init__(self, pattern: str, sizes: Mapping[str, int] | None = None, **named: int) -> None:
        given = {**(sizes or {}), **named}
        if pattern not in PATTERNS:
            raise InvalidParameter(f"unknown sparse-prefill pattern {pattern!r}; known: {sorted(PATTERNS)}")
        want = PATTERNS[pattern]
        if set(given) != set(want):
            raise InvalidParameter(f"pattern {pattern} takes sizes {list(want)}, got {sorted(given)}")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameter(f"pattern {pattern}: {name}={value!r} must be a non-negative int")
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "sizes", tuple((name, int(given[name])) for name in want))

    @property
    def params(self) -> dict[str, int]:
        """The sizes as keyword arguments of the pattern's index builder."""
        return dict(self.sizes)

    @property
    def label(self) -> str:
        """"vertical_slash(100, 750)"."""
        return f"{self.pattern}({', '.join(str(v) for _, v in self.sizes)})"

    def to_dict(self) -> dict[str, int | str]:
        """{"pattern": ..., size: value, ...} (the JSON form of engine/patterns/*.json)."""
        return {"pattern": self.pattern, **self.params}

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadPattern:
        """The inverse of to_dict; keys other than the pattern's sizes (a recall, a density) are ignored."""
        if "pattern" not in d:
            raise InvalidParameter(f"a head pattern needs a 'pattern' key, got {sorted(d)}")
        want = PATTERNS.get(d["pattern"], ())
        return cls(d["pattern"], {name: d[name] for name in want if name in d})


CAUSAL = HeadPattern("causal")


# ---- building a layer's index -------------------------------------------------------------------------


def head_patterns(patterns: HeadPattern | Sequence[HeadPattern], num_heads: int) -> list[HeadPattern]:
    """One pattern per query head: a single pattern is every head's; a list must name all num_heads."""
    if isinstance(patterns, HeadPattern):
        return [patterns] * num_heads
    patterns = list(patterns)
    if len(patterns) == 1:
        return patterns * num_heads
    if len(patterns) != num_heads or not all(isinstance(p, HeadPattern) for p in patterns):
        raise InvalidParameter(f"{len(patterns)} head patterns for {num_heads} query heads; give one, or one per head")
    return patterns


def build_index(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    csr: PageTableCSR,
    start: int,
    patterns: HeadPattern | Sequence[HeadPattern],
    *,
    block_size: int = BLOCK_SIZE,
    b: int = 0,
) -> SparseIndex:
    """Index of the chunk q [T, Hq, d] at positions [start, start + T) of sequence b, each head by its own pattern.

    Keys are read from the paged pool k_seq [N, Hkv, P, d] through csr; they must reach start + T.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ShapeMismatch(f"q has shape {_shape(q)}; expected a chunk [T, Hq, d]")
    heads = head_patterns(patterns, q.shape[1])
    built: dict[HeadPattern, SparseIndex] = {}
    for p in dict.fromkeys(heads):
        built[p] = _build_one(q, k_seq, csr, start, p, block_size, b)
    if len(built) == 1:
        return built[heads[0]]
    return _merge([built[p] for p in heads])


def _build_one(q, k_seq, csr, start, p: HeadPattern, block_size: int, b: int) -> SparseIndex:
    if p.pattern == "a_shape":
        # A-shape reads no keys; check the chunk lies in the cache as the key-reading builders do.
        if csr.host_lens[b] < start + q.shape[0]:
            raise PositionOutOfRange(f"the chunk ends at position {start + q.shape[0]}, but the sequence holds "
                                     f"{csr.host_lens[b]} positions; append the chunk's K/V first")
        return a_shape_index(q, start, block_size=block_size, **p.params)
    if p.pattern == "causal":
        if csr.host_lens[b] < start + q.shape[0]:
            raise PositionOutOfRange(f"the chunk ends at position {start + q.shape[0]}, but the sequence holds "
                                     f"{csr.host_lens[b]} positions; append the chunk's K/V first")
        return causal_index(q, start, block_size=block_size)
    if p.pattern == "vertical_slash":
        return vertical_slash_index(q, k_seq, csr, start, block_size=block_size, b=b, **p.params)
    return block_sparse_index(q, k_seq, csr, start, block_size=block_size, b=b, **p.params)


def _merge(rows: Sequence[SparseIndex]) -> SparseIndex:
    """Head h of the result is head h of rows[h] (indices of one chunk, each built for every head)."""
    first = rows[0]

    def stack(name: str, pad: bool) -> torch.Tensor:
        parts = [getattr(ix, name)[h] for h, ix in enumerate(rows)]
        if pad:
            width = max(t.shape[-1] for t in parts)
            parts = [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1) for t in parts]
        return torch.stack(parts).contiguous()

    return SparseIndex(first.block_size, first.start, first.num_queries, stack("block_index", True),
                       stack("block_count", False), stack("column_index", True), stack("column_count", False))


# ---- attention over an index --------------------------------------------------------------------------


def sparse_attention(
    q: torch.Tensor,
    k_seq: torch.Tensor,
    v_seq: torch.Tensor,
    csr: PageTableCSR,
    index: SparseIndex,
    *,
    backend: str = "auto",
    b: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention of q [T, Hq, d] restricted to `index`: out [T, Hq, d] (q dtype), lse [T, Hq] float32.

    backend "auto" runs the Triton kernel on CUDA and the gathered tiles of kvcache.prefill.block_sparse_cpu
    elsewhere; "torch" runs the reference, which computes every pair and masks.
    """
    if backend not in BACKENDS:
        raise InvalidParameter(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        try:
            out, lse = sparse_prefill(q.to(k_seq.dtype), k_seq, v_seq, csr, index, b=b)
        except IndexError as exc:  # the kernels raise builtin errors: give them their kvcache class
            raise PositionOutOfRange(str(exc)) from exc
        except TypeError as exc:
            raise DTypeMismatch(str(exc)) from exc
        except ValueError as exc:
            raise ShapeMismatch(str(exc)) from exc
        return out.to(q.dtype), lse
    if backend == "torch":
        return minference_prefill(q, k_seq, v_seq, csr, index, b=b)
    return block_sparse_prefill(q, k_seq, v_seq, csr, index, b=b)


def paged(k: torch.Tensor, v: torch.Tensor, page_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   PageTableCSR]:
    """Contiguous K/V [S, Hkv, d] as one sequence's pages: k_seq, v_seq [ceil(S/P), Hkv, P, d] and its page table.

    Pages of a fixed size (not one page of S) keep the kernel's compiled shapes the same from chunk to chunk.
    """
    S, Hkv, d = k.shape
    n = -(-S // page_size)

    def pages(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros((n * page_size, Hkv, d))
        padded[:S] = x
        return padded.view(n, page_size, Hkv, d).transpose(1, 2).contiguous()

    dev = k.device
    csr = PageTableCSR(torch.tensor([0, n], dtype=torch.int32, device=dev),
                       torch.arange(n, dtype=torch.int32, device=dev),
                       torch.tensor([S - (n - 1) * page_size], dtype=torch.int32, device=dev), page_size, (S,))
    return pages(k), pages(v), csr


# ---- what an index costs -------------------------------------------------------------------------------


def index_pairs(index: SparseIndex) -> tuple[int, int]:
    """(query-key pairs the index computes, causal pairs of the chunk), all heads; from the counts, no mask.

    A listed block before the query block counts whole; the query block's own block counts its
    causal triangle; a column counts once per query of the block (exact unless a column falls in
    the query block's own block, which vertical-slash lists only when diagonal 0 is dropped).
    """
    B, start, T = index.block_size, index.start, index.num_queries
    dev = index.block_count.device
    M = torch.arange(index.num_query_blocks, device=dev) + index.first_block  # absolute query blocks
    lo = torch.clamp(M * B, min=start)
    hi = torch.clamp((M + 1) * B, max=start + T)
    rows = hi - lo  # queries in each block
    # Causal keys of the queries [lo, hi) inside their own block: sum over i of (i - M*B + 1).
    own = (hi - M * B) * (hi - M * B + 1) // 2 - (lo - M * B) * (lo - M * B + 1) // 2
    valid = index.block_index >= 0
    diagonal = (index.block_index == M[None, :, None]) & valid
    full = (valid & ~diagonal).sum(dim=-1)  # [Hq, nq]
    has_diagonal = diagonal.any(dim=-1)
    computed = full * B * rows + has_diagonal * own + index.column_count * rows
    q_pos = torch.arange(start, start + T, dtype=torch.int64)
    causal = int((q_pos + 1).sum()) * index.num_heads
    return int(computed.sum()), causal


def index_bytes(index: SparseIndex, head_dim: int, itemsize: int) -> int:
    """K and V bytes the kernel reads for the index: per head and query block, B rows per listed block plus
    one row per column (each query block reads them once)."""
    rows = index.block_count.long().sum() * index.block_size + index.column_count.long().sum()
    return int(rows) * 2 * head_dim * itemsize


# ---- served: from a KVStore's sequence -----------------------------------------------------------------


@dataclass(frozen=True)
class SparsePrefillResult:
    """A served sparse prefill: out [T, Hq, d], lse [T, Hq] float32, the K/V bytes read, the pairs computed."""

    out: torch.Tensor
    lse: torch.Tensor
    bytes_read: int
    pairs: int  # query-key pairs computed
    causal_pairs: int  # of a dense causal prefill of the chunk

    @property
    def density(self) -> float:
        """Computed pairs over those of dense causal attention."""
        return self.pairs / max(self.causal_pairs, 1)


def _sequence_kv(store, seq_id: str, layer: int, q: torch.Tensor, start: int, block_size: int):
    """Checks a served chunk; returns (q on the device, k_seq, v_seq, csr) of the sequence at `layer`."""
    c = store.config
    if not isinstance(q, torch.Tensor):
        raise ShapeMismatch(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3 or q.shape[0] < 1 or q.shape[2] != c.head_dim or q.shape[1] % c.num_kv_heads:
        raise ShapeMismatch(f"q has shape {tuple(q.shape)}; expected a chunk [T >= 1, Hq (a multiple of "
                            f"Hkv={c.num_kv_heads}), d={c.head_dim}]")
    if q.dtype != c.dtype:
        raise DTypeMismatch(f"q has dtype {q.dtype}; the store holds {c.dtype}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise PositionOutOfRange(f"start must be a non-negative int, got {start!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidParameter(f"block_size must be a positive int, got {block_size!r}")
    csr = store.page_table([seq_id], layer)  # unknown sequence: SequenceNotFound; bad layer: InvalidParameter
    S = csr.host_lens[0]
    if start + q.shape[0] > S:
        raise PositionOutOfRange(f"the chunk covers positions [{start}, {start + q.shape[0]}), but sequence "
                                 f"{seq_id} holds {S} at layer {layer}; append the chunk's K/V first")
    q = q.to(c.device)
    if store.tiers is None:
        view = store.layer_view(layer)
        return q, view.k_seq, view.v_seq, csr
    # A tiered store's rows live in several tiers: read the chunk's keys and values once, lay them out as pages.
    n = start + q.shape[0]
    keys, values = store.read_positions(seq_id, layer, torch.arange(n).expand(c.num_kv_heads, n))
    k_seq, v_seq, csr = paged(keys.transpose(0, 1).to(c.device), values.transpose(0, 1).to(c.device),
                              c.page_size)
    return q, k_seq, v_seq, csr


def served_index(store, seq_id: str, layer: int, q: torch.Tensor, start: int,
                 patterns: HeadPattern | Sequence[HeadPattern], block_size: int = BLOCK_SIZE) -> SparseIndex:
    """The index of the chunk q [T, Hq, d] at [start, start + T) of `seq_id`, from the keys the store holds at
    `layer`."""
    q, k_seq, _, csr = _sequence_kv(store, seq_id, layer, q, start, block_size)
    return build_index(q, k_seq, csr, start, patterns, block_size=block_size)


def served_prefill(store, seq_id: str, layer: int, q: torch.Tensor, start: int,
                   patterns: HeadPattern | Sequence[HeadPattern], block_size: int = BLOCK_SIZE,
                   backend: str = "auto") -> SparsePrefillResult:
    """Sparse prefill attention of the chunk q [T, Hq, d] at `start` over what `seq_id` holds at `layer`."""
    if backend not in BACKENDS:
        raise InvalidParameter(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    q, k_seq, v_seq, csr = _sequence_kv(store, seq_id, layer, q, start, block_size)
    index = build_index(q, k_seq, csr, start, patterns, block_size=block_size)
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        B = block_size
        if B & (B - 1) or B < 16:
            raise InvalidParameter(f"the Triton kernel tiles blocks of a power of two >= 16, got block_size={B}")
    out, lse = sparse_attention(q, k_seq, v_seq, csr, index, backend=backend)
    pairs, causal = index_pairs(index)
    return SparsePrefillResult(out, lse, index_bytes(index, q.shape[2], k_seq.element_size()), pairs, causal)


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
