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


@dataclass(frozen=True)
class PairedBlocks:
    """A SparseIndex's block lists merged for query blocks 2j and 2j+1 (one program's 2B query rows), per head.

    block_index  [Hq, npairs, width]: key block ids listed for either block of the pair; first the `full_count`
                 listed for both and strictly before both (no mask needed), then the rest, ascending within each
                 part; -1 past block_count.
    member       [Hq, npairs, width] int32: bit 0 set when the lower query block lists the entry, bit 1 the upper.
    full_count   [Hq, npairs]
    block_count  [Hq, npairs]
    """

    block_index: torch.Tensor
    member: torch.Tensor
    full_count: torch.Tensor
    block_count: torch.Tensor

    @property
    def num_pairs(self) -> int:
        """npairs: ceil(nq / 2)."""
        return self.block_count.shape[1]


def pair_blocks(index: SparseIndex) -> PairedBlocks:
    """Merge each two consecutive query blocks' lists of `index` (on its device, no host sync but the width)."""
    H, nq, W = index.block_index.shape
    dev = index.block_index.device
    npairs = -(-nq // 2)
    nkb = index.first_block + nq  # no list goes past its own block
    listed = torch.arange(W, device=dev)[None, None, :] < index.block_count[..., None]
    target = torch.where(listed, index.block_index.long(), nkb)
    if nq % 2:  # an empty upper block for the last pair
        target = torch.cat([target, torch.full((H, 1, W), nkb, dtype=torch.long, device=dev)], dim=1)
    halves = []
    for half in (0, 1):
        bitmap = torch.zeros((H, npairs, nkb + 1), dtype=torch.bool, device=dev)
        bitmap.scatter_(2, target[:, half::2], True)
        halves.append(bitmap[..., :nkb])
    lower, upper = halves
    kb = torch.arange(nkb, device=dev)
    lower_block = index.first_block + 2 * torch.arange(npairs, device=dev)
    full = lower & upper & (kb[None, None, :] < lower_block[None, :, None])
    rest = (lower | upper) & ~full
    full_count = full.sum(dim=-1)
    block_count = full_count + rest.sum(dim=-1)
    width = max(int(block_count.max()), 1) if block_count.numel() else 1
    slot = torch.where(full, torch.cumsum(full, dim=-1) - 1,
                       torch.where(rest, full_count[..., None] + torch.cumsum(rest, dim=-1) - 1, width))
    ids = torch.full((H, npairs, width + 1), -1, dtype=torch.int32, device=dev)
    ids.scatter_(2, slot, kb.to(torch.int32).expand(H, npairs, nkb))
    member = torch.zeros((H, npairs, width + 1), dtype=torch.int32, device=dev)
    member.scatter_(2, slot, (lower.int() + 2 * upper.int()))
    return PairedBlocks(ids[..., :width].contiguous(), member[..., :width].contiguous(), full_count.int(),
                        block_count.int())
