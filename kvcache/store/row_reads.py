"""Reads of K/V from whichever tier holds each page: chosen rows, every key of a sequence, whole pages streamed.

Every reader of K/V rows outside the attention kernels goes through here (attention's torch path, fetch, the
gate's key pooling, the sparse prefill's index), so tier placement is known in one place. On an untiered store
the device pool is indexed by page id; on a tiered one by the page's device slot (docs/tiers.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from kvcache.kernels.csr import PageTableCSR
from kvcache.store.tier_manager import TierManager, pair
from kvcache.store.tiers import DEVICE, DISK, HOST, pinned_available, row_checksums

if TYPE_CHECKING:
    from kvcache.store.kv_store import KVStore

STREAM_CHUNK_PAGES = 256  # pages per chunk of a dense stream (4096 rows at P = 16)


class Moves:
    """Bytes one call moved onto the device, per source tier ({'device<-host': n}); also counted by the tiers."""

    def __init__(self, tiers: TierManager | None) -> None:
        self.tiers = tiers
        self.bytes: dict[str, int] = {}

    def add(self, src: int, nbytes: int) -> None:
        """Count `nbytes` moved from tier `src` to the device."""
        key = pair(DEVICE, src)
        self.bytes[key] = self.bytes.get(key, 0) + nbytes
        if self.tiers is not None:
            self.tiers.moved.add(key, bytes=nbytes)


def read_rows(store: KVStore, layer: int, pages: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor,
              moves: Moves) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows [n, d] on the device at (page id, kv head, row) triples (any shape, n elements)."""
    pool = store.pool
    pages, heads, rows = pages.flatten().long(), heads.flatten().long(), rows.flatten().long()
    tiers = store.tiers
    if tiers is None:
        dev = pool.k_seq.device
        _, Hkv, P, d = pool.k_seq[layer].shape
        # Row numbers in a [N * Hkv * P, d] view and one index_select per pool: indexing with three index tensors
        # went element by element (1.2 ms against 0.2 ms for 1000 rows of 3 heads on the CPU).
        index = ((pages.to(dev) * Hkv + heads.to(dev)) * P + rows.to(dev)).flatten()
        return (pool.k_seq[layer].reshape(-1, d).index_select(0, index),
                pool.v_seq[layer].reshape(-1, d).index_select(0, index))
    d = store.config.head_dim
    pages, heads, rows = pages.cpu(), heads.cpu(), rows.cpu()
    where = tiers.tier[pages]
    dev = pool.k_seq.device
    k = torch.empty((len(pages), d), dtype=pool.k_seq.dtype, device=dev)
    v = torch.empty_like(k)
    on_dev = torch.nonzero(where == DEVICE).flatten()
    if on_dev.numel():
        slots = tiers.slot[pages[on_dev]].long().to(dev)
        hd, rd, idx = heads[on_dev].to(dev), rows[on_dev].to(dev), on_dev.to(dev)
        k[idx] = pool.k_seq[layer][slots, hd, rd]
        v[idx] = pool.v_seq[layer][slots, hd, rd]
    for tier in (HOST, DISK):
        sel = torch.nonzero(where == tier).flatten()
        if not sel.numel():
            continue
        storage = tiers.storage[tier]
        Hkv, P = storage.shape[3], storage.shape[4]
        slots = tiers.slot[pages[sel]].long()
        # Flat row index in the tier's [N, 2, Hkv, P, d] layer view: K rows, then V rows, one gather.
        base = (slots * 2 * Hkv + heads[sel]) * P + rows[sel]
        index = torch.cat((base, base + Hkv * P))
        staging = torch.empty((len(index), d), dtype=k.dtype, pin_memory=pinned_available() and dev.type == "cuda")
        torch.index_select(storage.layer_rows(layer), 0, index, out=staging)
        both = staging.to(dev, non_blocking=True)
        # Every row read from a lower tier is checked against the checksum written with it, before it is used,
        # on the device it was copied to (the checksums travel with it: 4 bytes a row).
        sums = storage.sums_on(dev)[layer].view(-1)
        bad = row_checksums(both) != sums[index.to(sums.device)].to(dev, non_blocking=True)
        if bool(bad.any()):
            raise tiers.corrupted(sorted(set(pages[sel][bad.view(2, -1).any(0).cpu()].tolist())), tier)
        k[sel.to(dev)], v[sel.to(dev)] = both[: len(sel)], both[len(sel) :]
        moves.add(tier, staging.numel() * staging.element_size())
    return k, v


def read_positions(store: KVStore, layer: int, csr: PageTableCSR, b: int, positions: torch.Tensor,
                   moves: Moves) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows [Hkv, n, d] of sequence b at positions [Hkv, n] (each below its length)."""
    Hkv, n = positions.shape
    P = csr.page_size
    pos = positions.long()
    pages = csr.pages_of(b).to(pos.device)[pos // P]
    heads = torch.arange(Hkv, device=pos.device)[:, None].expand(Hkv, n)
    k, v = read_rows(store, layer, pages, heads, pos % P, moves)
    return k.view(Hkv, n, -1), v.view(Hkv, n, -1)


def read_sequence_keys(store: KVStore, layer: int, csr: PageTableCSR, b: int, moves: Moves) -> torch.Tensor:
    """Every key of sequence b [Hkv, S, d] on the device."""
    S = csr.host_lens[b]
    Hkv = store.config.num_kv_heads
    if store.tiers is None:
        pool = store.pool.k_seq[layer]
        rows = pool[csr.pages_of(b)]  # [n, Hkv, P, d]
        return rows.permute(1, 0, 2, 3).reshape(Hkv, -1, pool.shape[3])[:, :S]
    positions = torch.arange(S).expand(Hkv, S)
    return read_positions(store, layer, csr, b, positions, moves)[0]


def page_keys(store: KVStore, layer: int, page_ids: torch.Tensor) -> torch.Tensor:
    """Keys of pages page_ids [n] at `layer` as stored, [n, Hkv, P, d] on the device (rows past a page's fill are
    whatever the slot held)."""
    if store.tiers is None:
        if len(page_ids) == 1:  # a decode step: a slice, no index tensor copied to the device
            page = int(page_ids[0])
            return store.pool.k_seq[layer, page : page + 1]
        return store.pool.k_seq[layer, page_ids.to(store.config.device, torch.long)]
    c = store.config
    n, P = len(page_ids), c.page_size
    pages = page_ids.long().cpu()[:, None, None].expand(n, c.num_kv_heads, P)
    heads = torch.arange(c.num_kv_heads)[None, :, None].expand_as(pages)
    rows = torch.arange(P)[None, None, :].expand_as(pages)
    k, _ = read_rows(store, layer, pages, heads, rows, Moves(store.tiers))
    return k.view(n, c.num_kv_heads, P, c.head_dim)


def streamed_mismatch(tiers: TierManager, tier: int, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Which streamed pages kv [n, 2, Hkv, P, d] of `slots` on `tier` fail their row checksums ([n] bool, on kv's
    device, without waiting for it: the stream's copies keep overlapping; check_streamed reads the flags)."""
    sums = tiers.storage[tier].sums_on(kv.device)[layer]
    expected = sums[slots.long().to(sums.device)].to(kv.device, non_blocking=True)
    return (row_checksums(kv) != expected).flatten(1).any(1)


def check_streamed(tiers: TierManager, tier: int, pages: torch.Tensor, mismatch: list[torch.Tensor]) -> None:
    """PageCorrupted (the pages quarantined) if any streamed page of `pages` (in stream order) failed its rows'
    checksums (mismatch: streamed_mismatch of each chunk)."""
    if not mismatch:
        return
    bad = torch.cat(mismatch).cpu()
    if bool(bad.any()):
        raise tiers.corrupted(sorted(set(pages[bad].tolist())), tier)


def stream_pages(
    layer_data: torch.Tensor, slots: torch.Tensor, device: torch.device, chunk: int = STREAM_CHUNK_PAGES
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Pages `slots` of one layer of a lower tier ([N, 2, Hkv, P, d]) on `device`, a chunk at a time.

    On CUDA the next chunk is gathered into pinned staging and its copy started on a side stream
    while the caller attends to the current one (double buffering); a run of consecutive slots
    is copied straight from the tier without the gather.
    """
    n = len(slots)
    if device.type != "cuda":
        for lo in range(0, n, chunk):
            yield (lo, min(n, lo + chunk)), layer_data[slots[lo : lo + chunk]]
        return
    copy_stream = torch.cuda.Stream(device)
    pinned = layer_data.is_pinned()

    def start(lo: int):
        part = slots[lo : lo + chunk]
        first, last = int(part[0]), int(part[-1])
        if pinned and last - first + 1 == len(part) and bool((part[1:] - part[:-1] == 1).all()):
            src = layer_data[first : last + 1]
        else:
            src = torch.empty((len(part), *layer_data.shape[1:]), dtype=layer_data.dtype, pin_memory=True)
            torch.index_select(layer_data, 0, part, out=src)
        with torch.cuda.stream(copy_stream):
            dst = src.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return (lo, min(n, lo + chunk)), src, dst, done

    nxt = start(0) if n else None
    while nxt is not None:
        span, _staging, dst, done = nxt  # the staging buffer lives until its copy is waited on
        nxt = start(span[1]) if span[1] < n else None  # overlaps the copy and attention of this chunk
        torch.cuda.current_stream(device).wait_event(done)
        dst.record_stream(torch.cuda.current_stream(device))
        yield span, dst
