"""Checks of what an append (or a create) is given: the layer, the K/V tensors, the start position, the token ids,
a lease. Each raises the kvcache.errors class that names what is wrong and changes nothing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import DTypeMismatch, InvalidParameter, PositionOutOfRange, ShapeMismatch
from kvcache.store.page_table import SequenceState


def check_layers(config: KVCacheConfig, layer: int | None) -> list[int]:
    """[layer] after checking it names one of the store's layers; every layer for None."""
    L = config.num_layers
    if layer is None:
        return list(range(L))
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise InvalidParameter(f"layer {layer!r} out of range; the store has {L} layers")
    return [layer]


def check_kv(config: KVCacheConfig, k: torch.Tensor, v: torch.Tensor, layer: int | None) -> tuple[torch.Tensor,
                                                                                       torch.Tensor]:
    """k, v as [L or 1, T, Hkv, d] on the store's device, after validate_kv."""
    validate_kv(config, k, v, layer)
    if layer is not None:
        k, v = k.unsqueeze(0), v.unsqueeze(0)
    return k.to(config.device), v.to(config.device)


def validate_kv(config: KVCacheConfig, k: torch.Tensor, v: torch.Tensor, layer: int | None) -> None:
    """ShapeMismatch / DTypeMismatch unless k, v are [L, T, Hkv, d] (layer None) or [T, Hkv, d] in the store's
    dtype."""
    c = config
    if layer is None:
        expect, names = (c.num_layers, None, c.num_kv_heads, c.head_dim), "[L, T, Hkv, d]"
    else:
        expect, names = (None, c.num_kv_heads, c.head_dim), "[T, Hkv, d]"
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ShapeMismatch(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(expect) or any(e is not None and e != s for e, s in zip(expect, t.shape)):
            want = tuple("T" if e is None else e for e in expect)
            raise ShapeMismatch(f"{name} has shape {tuple(t.shape)}; expected {names} = {want}")
        if t.dtype != c.dtype:
            raise DTypeMismatch(f"{name} has dtype {t.dtype}; the store holds {c.dtype}")
    if k.shape != v.shape:
        raise ShapeMismatch(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if k.shape[-3] == 0:
        raise ShapeMismatch("k and v hold no positions (T = 0)")


def check_start(seq: SequenceState, layers: list[int], start: int | None) -> int:
    """The position an append to `layers` of `seq` starts at, after checking they agree and `start` (if given)."""
    current = {seq.lengths[layer] for layer in layers}
    if len(current) > 1:
        raise PositionOutOfRange(
            f"sequence {seq.seq_id}: layers hold different lengths {sorted(current)}; append one layer at a time"
        )
    (length,) = current
    if start is not None and start != length:
        raise PositionOutOfRange(
            f"sequence {seq.seq_id}: append at position {start}, but the next position is {length}"
        )
    return length


def new_token_ids(seq: SequenceState, start: int, ids: list[int], num_new: int) -> list[int]:
    """The ids of `ids` not yet known to `seq`, after checking they agree with the known ones."""
    if len(ids) != num_new:
        raise ShapeMismatch(f"{len(ids)} token ids for {num_new} positions")
    known = len(seq.token_ids)
    if start > known:
        raise PositionOutOfRange(
            f"sequence {seq.seq_id}: token ids given from position {start}, but ids are known only up to {known}"
        )
    overlap = min(known - start, num_new)
    if seq.token_ids[start : start + overlap] != ids[:overlap]:
        raise InvalidParameter(f"sequence {seq.seq_id}: token ids at {start}.. differ from those given before")
    return ids[overlap:]


def as_token_list(token_ids: Sequence[int]) -> list[int]:
    """token_ids (a sequence or a tensor) as a list, after checking they are non-negative ints."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.flatten().tolist()
    ids = list(token_ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise InvalidParameter("token_ids must be non-negative ints")
    return ids


def check_lease(lease_seconds: object) -> None:
    """InvalidParameter unless a lease is None (none) or a positive finite number of seconds."""
    if lease_seconds is None:
        return
    if (isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float))
            or not math.isfinite(lease_seconds) or lease_seconds <= 0):
        raise InvalidParameter(f"lease_seconds={lease_seconds!r} must be a positive number of seconds (or none)")
