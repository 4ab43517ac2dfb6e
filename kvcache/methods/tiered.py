"""Attention over a tiered store: every method reads its K/V rows from whichever tier holds them.

Stage 1 of SparQ and Quest's page scores read `k_dim` and the summaries, which stay on the device
for every page (kvcache.store.tier_manager). What moves:
  dense   every offloaded page, streamed in chunks (torch path: gathered into pinned staging and
          copied with double buffering; Triton path: the kernel reads pinned host pages over PCIe);
  sparq   only the k chosen rows of K and V (§1 step 6) that are not on the device;
  quest   only the chosen pages that are not on the device.
The device part and each offloaded part are attended separately and merged by lse (§4), exact
for every method: the parts split one softmax over disjoint rows. SparQ's alpha and mean-value
reallocation are applied once, after the merge, from stage-1 scores over all positions.

Rows on the disk tier are read from its memory map (only the rows needed) on the torch path; the
Triton path serves device and host rows and leaves a batch that touches the disk to the torch path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from kvcache.methods import AttentionResult, merge_lse
from kvcache.methods.dense import attend_rows
from kvcache.methods.gather import gather_key_dims
from kvcache.methods.quest import quest_page_scores, select_pages
from kvcache.methods.sparq import i1_of, reallocate_mean, select_rows
from kvcache.store.tier_manager import TierManager, pair
from kvcache.store.page_table import PageTableCSR
from kvcache.store.tiers import DEVICE, DISK, HOST, pinned_available

STREAM_CHUNK_PAGES = 256  # pages per chunk of a dense stream (4096 rows at P = 16)


class _Moves:
    """Bytes one call moved onto the device, per source tier."""

    def __init__(self, tiers: TierManager) -> None:
        self.tiers = tiers
        self.bytes: dict[str, int] = {}

    def add(self, src: int, nbytes: int) -> None:
        key = pair(DEVICE, src)
        self.bytes[key] = self.bytes.get(key, 0) + nbytes
        self.tiers.moved.add(key, bytes=nbytes)


def attend_tiered(
    store, seq_ids: list[str], layer: int, method: str, q: torch.Tensor, params: dict, use_triton: bool,
    traffic: int,
) -> AttentionResult:
    """Run `method` over sequences whose pages may sit in any tier; `traffic` is the method's bytes_read."""
    tiers: TierManager = store.tiers
    csr = store.page_table(seq_ids, layer)
    moves = _Moves(tiers)
    scale = params.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    on_disk = bool((tiers.tier_dev[csr.indices.long()] == DISK).any()) if csr.indices.numel() else False
    if use_triton and not on_disk:
        out, lse = _triton(store, seq_ids, csr, layer, method, q, params, moves)
    else:
        out, lse = _torch(store, seq_ids, csr, layer, method, q, params, scale, moves)
    return AttentionResult(out, lse, traffic, moves.bytes)


# ---- torch path -------------------------------------------------------------------------------


def _torch(store, seq_ids, csr: PageTableCSR, layer: int, method: str, q, params, scale, moves: _Moves):
    B, Hq, d = q.shape
    Hkv = store.config.num_kv_heads
    G = Hq // Hkv
    tiers: TierManager = store.tiers
    view = store.layer_view(layer)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b, S in enumerate(csr.host_lens):
        qg = q[b].view(Hkv, G, d).float()
        pages = csr.pages_of(b)
        if method == "dense":
            y, s = _dense_one(store, layer, qg, pages.cpu(), S, scale, moves)
        elif method == "sparq":
            r, k = params["r"], params["k"]
            i2, alpha = select_rows(qg, gather_key_dims(view.k_dim, csr, b, i1_of(qg, r)), r, S, k,
                                    params.get("local_window", 0), scale)
            if not params.get("reallocate", True):
                alpha = torch.ones_like(alpha)
            heads = torch.arange(Hkv, device=i2.device)[:, None].expand_as(i2)
            P = csr.page_size
            row_pages = pages[i2 // P]
            if tiers.tracks_choices:
                tiers.note_chosen(row_pages)
            kr, vr = read_rows(store, layer, row_pages.cpu(), heads.cpu(), (i2 % P).cpu(), moves)
            y, s = attend_rows(qg, kr.view(Hkv, -1, d), vr.view(Hkv, -1, d), scale)
            y = reallocate_mean(y, alpha, store.value_mean([seq_ids[b]], layer)[0])
        elif method == "quest":
            chosen = select_pages(quest_page_scores(qg, view.k_summary[pages], scale), params["top_pages"])
            if tiers.tracks_choices:
                tiers.note_chosen(pages[chosen])
            y, s = _pages_one(store, layer, qg, pages, chosen, S, scale, moves)
        else:
            raise ValueError(f"no tiered path for method {method!r}")
        out[b], lse[b] = y.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return out, lse


def read_tiered_rows(store, seq_id: str, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows [Hkv, k, d] of a sequence at positions [Hkv, k], from whichever tier holds them (a fetch)."""
    with store.lock:  # the page table and the tiers must agree while the rows are read
        csr = store.page_table([seq_id], layer)
        Hkv, n = positions.shape
        P = csr.page_size
        pos = positions.cpu()
        heads = torch.arange(Hkv)[:, None].expand(Hkv, n)
        k, v = read_rows(store, layer, csr.pages_of(0).cpu()[pos // P], heads, pos % P, _Moves(store.tiers))
        return k.view(Hkv, n, -1), v.view(Hkv, n, -1)


def read_rows(store, layer: int, pages: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor,
              moves: _Moves) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows [n, d] at (page id, kv head, row) triples, from whichever tier holds each page."""
    tiers: TierManager = store.tiers
    pool = store.pool
    d = store.config.head_dim
    pages, heads, rows = pages.flatten().long(), heads.flatten().long(), rows.flatten().long()
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
        k[sel.to(dev)], v[sel.to(dev)] = both[: len(sel)], both[len(sel) :]
        moves.add(tier, staging.numel() * staging.element_size())
    return k, v


def _pages_one(store, layer, qg, pages, chosen, S, scale, moves):
    """Exact attention of one sequence's groups over chosen page indexes [Hkv, t] (rows past S masked)."""
    Hkv, t = chosen.shape
    P = store.config.page_size
    heads = torch.arange(Hkv)[:, None, None].expand(Hkv, t, P)
    row = torch.arange(P)[None, None, :].expand(Hkv, t, P)
    page_ids = pages.cpu()[chosen.cpu()][:, :, None].expand(Hkv, t, P)
    k, v = read_rows(store, layer, page_ids, heads, row, moves)
    d = k.shape[-1]
    positions = (chosen[..., None] * P + torch.arange(P, device=chosen.device)).flatten(1)
    return attend_rows(qg, k.view(Hkv, t * P, d), v.view(Hkv, t * P, d), scale, mask=positions < S)


def _dense_one(store, layer, qg, pages, S, scale, moves):
    """Exact attention of one sequence: device pages in place, offloaded pages streamed; merged by lse."""
    tiers: TierManager = store.tiers
    P = store.config.page_size
    n = len(pages)
    fills = torch.full((n,), P)
    fills[-1] = S - (n - 1) * P
    where = tiers.tier[pages.long()]
    outs, lses = [], []
    on_dev = torch.nonzero(where == DEVICE).flatten()
    if on_dev.numel():
        slots = tiers.slot[pages[on_dev].long()].long().to(qg.device)
        k = store.pool.k_seq[layer][slots]  # [m, Hkv, P, d]
        v = store.pool.v_seq[layer][slots]
        outs_lses = _attend_pages(qg, k, v, fills[on_dev], scale)
        outs.append(outs_lses[0])
        lses.append(outs_lses[1])
    for tier in (HOST, DISK):
        sel = torch.nonzero(where == tier).flatten()
        if not sel.numel():
            continue
        storage = tiers.storage[tier]
        slots = tiers.slot[pages[sel].long()].long()
        for (lo, hi), kv in stream_pages(storage.data[layer], slots, qg.device):
            y, s = _attend_pages(qg, kv[:, 0], kv[:, 1], fills[sel[lo:hi]], scale)
            outs.append(y)
            lses.append(s)
            moves.add(tier, kv.numel() * kv.element_size())
    return merge_lse(torch.stack(outs), torch.stack(lses))


def _attend_pages(qg, k, v, fills, scale):
    """Attention of qg [Hkv, G, d] over whole pages k, v [m, Hkv, P, d] with fills[m] rows each."""
    m, Hkv, P, d = k.shape
    rows = torch.arange(P)[None, :] < fills[:, None]  # [m, P]
    mask = rows.flatten().to(qg.device)[None, :].expand(Hkv, -1)
    return attend_rows(qg, k.transpose(0, 1).reshape(Hkv, m * P, d), v.transpose(0, 1).reshape(Hkv, m * P, d),
                       scale, mask=mask)


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


# ---- Triton path: the kernels read device and pinned-host pools in place ------------------------------------

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One reusable stream per device for the offloaded part of an attention call."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _triton(store, seq_ids, csr: PageTableCSR, layer: int, method: str, q, params, moves: _Moves):
    from kvcache.kernels.paged_decode import MODE_PAGES, MODE_ROWS, Partials, attend_partial, merge_partials
    from kvcache.kernels.quest import quest_select
    from kvcache.kernels.sparq import sparq_select, sparq_stage1

    tiers: TierManager = store.tiers
    view = store.layer_view(layer)
    Hkv, P = store.config.num_kv_heads, csr.page_size
    B = q.shape[0]
    BH = B * Hkv
    scale = params.get("scale")
    alpha_inputs = vbar = None
    if method == "sparq":
        s1 = sparq_stage1(q, view.k_dim, csr, params["r"], scale=scale)
        items = sparq_select(s1, csr, Hkv, params["k"], params.get("local_window", 0))
        list_len = torch.full((BH,), items.shape[1], dtype=torch.int32, device=q.device)
        mode, page_index, item_bytes = MODE_ROWS, items // P, 1
        if params.get("reallocate", True):
            alpha_inputs = (s1.logits, s1.stat_m, s1.stat_l, s1.num_splits)
            vbar = store.value_mean(seq_ids, layer).float().reshape(BH, -1)
    else:
        if method == "quest":
            items, list_len = quest_select(q, view.k_summary, csr, params["top_pages"], scale)
        else:  # dense: every page of every sequence
            n_pages = csr.page_counts().repeat_interleave(Hkv)
            max_pages = max(-(-S // P) for S in csr.host_lens)
            items = torch.arange(max_pages, dtype=torch.int32, device=q.device).expand(BH, -1).contiguous()
            list_len = n_pages.int()
        mode, page_index, item_bytes = MODE_PAGES, items, P
    # Tier of each item, through the sequence's page table; items past list_len are ignored.
    starts = csr.indptr[:-1].repeat_interleave(Hkv)[:, None]
    live = torch.arange(items.shape[1], device=q.device)[None, :] < list_len[:, None]
    page_ids = csr.indices[(starts + page_index.clamp(min=0)).clamp(max=max(csr.indices.numel() - 1, 0)).long()]
    where = torch.where(live, tiers.tier_dev[page_ids.long()], -1)
    if method != "dense" and tiers.tracks_choices:  # a host sync: only for a policy that asks
        tiers.note_chosen(page_ids[live])
    slot_csr = PageTableCSR(csr.indptr, tiers.slot_dev[csr.indices.long()], csr.last_page_len, P, csr.host_lens)
    row_bytes = 2 * store.config.head_dim * store.config.itemsize
    parts = []
    pools = {DEVICE: (view.k_seq, view.v_seq)}
    if HOST in tiers.storage:
        host = tiers.storage[HOST].data[layer]  # [N, 2, Hkv, P, d], pinned: the kernel reads it over PCIe
        pools[HOST] = (host[:, 0], host[:, 1])
    mine = {tier: where == tier for tier in pools}
    counts = {tier: m.sum(dim=1, dtype=torch.int32) for tier, m in mine.items()}
    totals = dict(zip(counts, torch.stack([c.sum() for c in counts.values()]).tolist()))  # one host sync
    cuda = q.device.type == "cuda"
    main = torch.cuda.current_stream(q.device) if cuda else None
    side = _side_stream(q.device) if cuda else None
    joins = []
    # Offloaded parts first, on a side stream: they wait on PCIe while the device part runs.
    for tier in sorted(pools, key=lambda t: t == DEVICE):
        if tier != DEVICE and totals[tier] == 0:
            continue
        k_pool, v_pool = pools[tier]
        stream = side if tier != DEVICE else main
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            if cuda and tier != DEVICE:
                stream.wait_stream(main)
            # Items of this tier first in each row (a stable sort keeps their order), then its count.
            order = torch.sort((~mine[tier]).to(torch.int8), dim=1, stable=True).indices
            mine_items = torch.gather(items, 1, order).to(torch.int32).contiguous()
            parts.append(attend_partial(q, k_pool, v_pool, slot_csr, items.shape[1] * item_bytes, mode,
                                        item_list=mine_items, list_len=counts[tier], alpha_inputs=alpha_inputs,
                                        scale=scale))
            if cuda and tier != DEVICE:
                for t in (parts[-1].out, parts[-1].lse, parts[-1].alpha):
                    if t is not None:  # made on the side stream, read by the merge on the main one
                        t.record_stream(main)
                done = torch.cuda.Event()
                done.record(stream)
                joins.append(done)
        if tier != DEVICE:
            moves.add(tier, totals[tier] * item_bytes * row_bytes)
    for done in joins:
        main.wait_event(done)
    return merge_partials(q, Partials.concat(parts), Hkv, vbar)
