"""What a KVCacheCache keeps between and within forwards: its rows' sequences, its totals, the forward running
(docs/transformers.md, "Batches and padding")."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from kvcache.clients.inprocess import KVCacheClient, StepCalls
from kvcache.errors import SequenceNotFound


@dataclass
class Row:
    """One batch row: its sequence in the store, the positions the store holds, and the positions the model has run
    (fewer while a reused prefix has not been run through the model yet)."""

    seq_id: str
    held: int
    fed: int = 0


class Sequences:
    """The sequence ids a KVCacheCache holds, freed by `free_all` when asked or when the cache is garbage-collected
    (a cache made inline in a generate call is never released by hand)."""

    def __init__(self, client: KVCacheClient) -> None:
        self.client = client
        self.ids: set[str] = set()

    def free(self, seq_id: str) -> None:
        """Free one sequence (already gone: nothing to do)."""
        self.ids.discard(seq_id)
        with contextlib.suppress(SequenceNotFound):
            self.client.free(seq_id)

    def free_all(self) -> None:
        """Free every sequence still held; a client that is closed or unreachable keeps them (a lease frees them)."""
        for seq_id in list(self.ids):
            try:
                self.free(seq_id)
            except Exception:  # run by the garbage collector: there is nobody to tell
                self.ids.discard(seq_id)


@dataclass
class CacheTotals:
    """What a KVCacheCache did, over every forward so far (all rows)."""

    reused_tokens: int = 0  # prompt positions the store's prefix cache already held (their pages shared)
    skipped_tokens: int = 0  # of those, positions the model never ran (reuse_prefix)
    prefill_tokens: int = 0  # real tokens run through the model in prefill forwards
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens fed by decode steps, all rows
    attention_bytes: int = 0  # bytes the store's decode attention read, all layers and rows
    steps_by_method: dict[str, int] = field(default_factory=dict)  # decode steps per method that ran

    @property
    def attention_bytes_per_token(self) -> float:
        """Decode attention bytes read per decoded token (all layers)."""
        return self.attention_bytes / self.decode_tokens if self.decode_tokens else 0.0


@dataclass
class Forward:
    """One forward of the model through the cache, begun before its first layer."""

    columns: int  # T: the columns of input_ids this forward runs
    real: list[torch.Tensor]  # per row, the indices of its real (not padding) columns
    tokens: list[list[int] | None]  # per row, the token ids of those columns (None: embeddings were given)
    decode: bool  # one real token per row after a whole cache: a step of the store
    attended: int = 0  # layers done
    step: StepCalls | None = None
    method: str = ""
    bytes_read: int = 0
    keys: list[list[torch.Tensor]] = field(default_factory=list)  # prefill: per row, per layer, rows to append
    values: list[list[torch.Tensor]] = field(default_factory=list)


def real_columns(attention_mask: torch.Tensor | None, batch: int, columns: int, total: int) -> torch.Tensor:
    """[B, T] bool: which of a forward's T columns are tokens, from the 2-D mask over all `total` columns."""
    if attention_mask is None:
        return torch.ones(batch, columns, dtype=torch.bool)
    if tuple(attention_mask.shape) != (batch, total):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; this forward needs ({batch}, "
                         f"{total}): the columns run before plus its own")
    return attention_mask[:, total - columns:].to("cpu", torch.bool)
