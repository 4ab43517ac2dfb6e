"""SparseIndex: per query block, the key blocks and gathered columns a sparse prefill attends to (the
block-sparse prefill kernel's input; the index builders make them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseIndex:
    """Which keys each query block of a chunk attends to, per query head (int32 tensors).

    block_index  [Hq, nq, max_blocks]: key block ids, ascending, never past the query block's own
                 block M; entries past block_count are -1. M itself (the diagonal block) is then
                 the last entry whenever listed: always by A-shape, block-sparse and causal, and
                 by vertical-slash whenever diagonal 0 is kept (by default it always is).
    block_count  [Hq, nq]
    column_index [Hq, nq, max_cols]: extra key positions (vertical-slash), ascending, none inside
                 a listed block; entries past column_count are -1. max_cols is 0 for the patterns
                 without columns.
    column_count [Hq, nq]

    Query block m (0 <= m < nq) is absolute block first_block + m; see the module docstring.
    """

    block_size: int
    start: int  # absolute position of the chunk's first query
    num_queries: int  # T
    block_index: torch.Tensor
    block_count: torch.Tensor
    column_index: torch.Tensor
    column_count: torch.Tensor

    @property
    def first_block(self) -> int:
        """Absolute block of the chunk's first query."""
        return self.start // self.block_size

    @property
    def num_query_blocks(self) -> int:
        """nq: blocks the chunk's queries fall in."""
        return self.block_count.shape[1]

    @property
    def num_heads(self) -> int:
        """Hq."""
        return self.block_count.shape[0]

    @property
    def num_keys(self) -> int:
        """Positions the chunk may attend to: start + T."""
        return self.start + self.num_queries

    @property
    def has_columns(self) -> bool:
        """Whether the index lists gathered columns (vertical-slash) besides blocks."""
        return self.column_index.shape[-1] > 0

    def check_chunk(self, q: torch.Tensor) -> None:
        """Raise ValueError unless q [T, Hq, d] is the chunk this index is for (its queries and heads)."""
        if q.dim() != 3 or self.num_queries != q.shape[0] or self.num_heads != q.shape[1]:
            raise ValueError(f"the index is for {self.num_queries} queries x {self.num_heads} heads; "
                             f"q has shape {tuple(q.shape)}")

    def mask(self, head: int) -> torch.Tensor:
        """(query, key) pairs of `head` that attention computes [T, start+T] bool: listed blocks and columns, causal."""
        B, S, T = self.block_size, self.num_keys, self.num_queries
        dev = self.block_index.device
        n_kblocks = -(-S // B)
        blocks = _compact_to_mask(self.block_index[head], self.block_count[head], n_kblocks)  # [nq, nkb]
        columns = _compact_to_mask(self.column_index[head], self.column_count[head], S)  # [nq, S]
        q_pos = self.start + torch.arange(T, device=dev)
        k_pos = torch.arange(S, device=dev)
        qblock = q_pos // B - self.first_block
        allowed = blocks[qblock][:, k_pos // B] | columns[qblock]
        return allowed & (k_pos[None, :] <= q_pos[:, None])


def _compact_to_mask(entries: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of ids [n, k] with their counts [n] -> bool [n, width], True at each listed id."""
    n, k = entries.shape
    valid = torch.arange(k, device=entries.device)[None, :] < count[:, None]
    out = torch.zeros((n, width + 1), dtype=torch.bool, device=entries.device)
    out.scatter_(1, torch.where(valid, entries.long(), width), True)  # invalid entries land in the spare column
    return out[:, :width]
