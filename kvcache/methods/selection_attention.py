"""Exact attention over what a method selected (a Selection), on the torch and the Triton path, for every tier.

One path for every method (docs/architecture.md): the method selects on the device; the rows it chose are read
where their tier holds them and attended to; parts over disjoint rows merge by lse (docs/sparse-attention.md §4),
which is exact; mean-value reallocation (§1 step 7) is applied once, after the merge. An untiered store is the
one-tier case.

Torch path: per sequence, the chosen rows are read through the store's row reads (kvcache.store.row_reads:
device rows in place, host and disk rows gathered and copied); dense attention streams offloaded pages in chunks.
Triton path: the kernels read device and pinned-host pools in place, the offloaded part on a side stream; a
batch that touches the disk tier takes the torch path (kvcache.methods.attend decides).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import (
    MODE_DENSE,
    MODE_PAGES,
    MODE_ROWS,
    Partials,
    attend_partial,
    merge_partials,
)
from kvcache.methods.base import Selection
from kvcache.methods.dense import attend_rows
from kvcache.methods.gather import gather_sequence
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.merge import merge_lse
from kvcache.methods.sparq import reallocate_mean
from kvcache.store.row_reads import check_streamed, read_positions, stream_pages, streamed_mismatch
from kvcache.store.tier_manager import TierManager
from kvcache.store.tiers import DEVICE, DISK, HOST

# ---- torch path ---------------------------------------------------------------------------------------------


def attend_torch(q: torch.Tensor, inputs: LayerInputs, sel: Selection, scale: float) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """out [B, Hq, d] (q's dtype), lse [B, Hq] float32 of q over the selected rows, read from any tier."""
    B, Hq, d = q.shape
    Hkv = inputs.num_kv_heads
    G = Hq // Hkv
    csr = inputs.csr
    tiers = inputs.store.tiers
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=q.device)
    for b, S in enumerate(csr.host_lens):
        qg = q[b].view(Hkv, G, d).float()
        rows = slice(b * Hkv, (b + 1) * Hkv)
        if sel.mode == MODE_DENSE:
            y, s = _dense_sequence(inputs, qg, b, scale)
        else:
            positions, valid = _positions(sel, rows, csr.page_size, S)
            if tiers is not None and tiers.tracks_choices:
                chosen = positions if valid is None else positions[valid]
                tiers.note_chosen(csr.pages_of(b).cpu()[chosen.cpu() // csr.page_size])
            k, v = read_positions(inputs.store, inputs.layer, csr, b, positions, inputs.moves)
            y, s = attend_rows(qg, k, v, scale, mask=valid)
        if sel.alpha is not None:
            y = reallocate_mean(y, sel.alpha[rows], inputs.value_mean[b])
        out[b], lse[b] = y.reshape(Hq, d).to(q.dtype), s.reshape(Hq)
    return out, lse


def _positions(sel: Selection, rows: slice, page_size: int, S: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions [Hkv, n] one sequence reads (padding replaced by position 0) and which of them count (None: all)."""
    items = sel.items[rows].long()  # [Hkv, t]
    Hkv, t = items.shape
    slot_ok = None
    if sel.count is not None:
        slot_ok = torch.arange(t, device=items.device)[None, :] < sel.count[rows].to(items.device).long()[:, None]
    if sel.mode == MODE_ROWS:
        valid = slot_ok
    else:  # MODE_PAGES: every row of each chosen page, those past the sequence's end masked
        items = (items[..., None] * page_size + torch.arange(page_size, device=items.device)).flatten(1)
        valid = items < S
        if slot_ok is not None:
            valid &= slot_ok.repeat_interleave(page_size, 1)
    if valid is None:
        return items, None
    return torch.where(valid, items, 0), valid


def _dense_sequence(inputs: LayerInputs, qg: torch.Tensor, b: int, scale: float) -> tuple[torch.Tensor,
                                                                                        torch.Tensor]:
    """Exact attention of sequence b's groups qg [Hkv, G, d] over all its positions: device pages in place,
    offloaded pages streamed; parts merged by lse."""
    store, csr, layer = inputs.store, inputs.csr, inputs.layer
    tiers: TierManager | None = store.tiers
    if tiers is None:
        pool = store.pool
        return attend_rows(qg, gather_sequence(pool.k_seq[layer], csr, b), gather_sequence(pool.v_seq[layer], csr, b),
                           scale)
    P = csr.page_size
    S = csr.host_lens[b]
    pages = csr.pages_of(b).cpu()
    n = len(pages)
    fills = torch.full((n,), P)
    fills[-1] = S - (n - 1) * P
    where = tiers.tier[pages.long()]
    outs, lses = [], []
    on_dev = torch.nonzero(where == DEVICE).flatten()
    if on_dev.numel():
        slots = tiers.slot[pages[on_dev].long()].long().to(qg.device)
        y, s = _attend_pages(qg, store.pool.k_seq[layer][slots], store.pool.v_seq[layer][slots], fills[on_dev],
                             scale)
        outs.append(y)
        lses.append(s)
    for tier in (HOST, DISK):
        sel = torch.nonzero(where == tier).flatten()
        if not sel.numel():
            continue
        slots = tiers.slot[pages[sel].long()].long()
        mismatch = []
        for (lo, hi), kv in stream_pages(tiers.storage[tier].data[layer], slots, qg.device):
            mismatch.append(streamed_mismatch(tiers, tier, layer, slots[lo:hi], kv))
            y, s = _attend_pages(qg, kv[:, 0], kv[:, 1], fills[sel[lo:hi]], scale)
            outs.append(y)
            lses.append(s)
            inputs.moves.add(tier, kv.numel() * kv.element_size())
        check_streamed(tiers, tier, pages[sel], mismatch)  # before any part is merged into a result
    return merge_lse(torch.stack(outs), torch.stack(lses))


def _attend_pages(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fills: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of qg [Hkv, G, d] over whole pages k, v [m, Hkv, P, d] with fills[m] rows each."""
    m, Hkv, P, d = k.shape
    rows = torch.arange(P)[None, :] < fills[:, None]  # [m, P]
    mask = rows.flatten().to(qg.device)[None, :].expand(Hkv, -1)
    return attend_rows(qg, k.transpose(0, 1).reshape(Hkv, m * P, d), v.transpose(0, 1).reshape(Hkv, m * P, d),
                       scale, mask=mask)


# ---- Triton path --------------------------------------------------------------------------------------------

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One reusable stream per device for the offloaded part of an attention call."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def attend_triton(q: torch.Tensor, inputs: LayerInputs, sel: Selection, scale: float | None,
                  with_alpha: bool = False) -> tuple[torch.Tensor, ...]:
    """out, lse of q over the selected rows by the paged kernels: device pools, and pinned host pages in place. With
    `with_alpha`, also the alpha [B*Hkv, G] the attention summed (SparQ's stage-1 mass of the rows read, from
    sel.alpha_inputs or sel.coverage_inputs; None without either): a reduction on the device, no sync."""
    store, csr, view = inputs.store, inputs.csr, inputs.view
    Hkv = inputs.num_kv_heads
    BH = q.shape[0] * Hkv
    vbar = inputs.value_mean.float().reshape(BH, -1) if sel.alpha_inputs is not None else None
    # The kernels take int32 lists; the torch selections make int64 ones (the GPU selections already int32).
    if sel.items is not None and sel.items.dtype != torch.int32:
        sel = replace(sel, items=sel.items.to(torch.int32))
    if sel.count is not None and sel.count.dtype != torch.int32:
        sel = replace(sel, count=sel.count.to(torch.int32))
    stats = sel.alpha_inputs if sel.alpha_inputs is not None else sel.coverage_inputs
    if store.tiers is None:
        if sel.mode == MODE_DENSE:
            max_items = csr.max_len
        else:
            max_items = sel.items.shape[1] * (csr.page_size if sel.mode == MODE_PAGES else 1)
        parts = attend_partial(q, view.k_seq, view.v_seq, csr, max_items, sel.mode, item_list=sel.items,
                               list_len=sel.count, alpha_inputs=stats, scale=scale, launch=sel.launch, pdl=sel.pdl)
        out, lse = merge_partials(q, _reallocating(parts, sel), Hkv, vbar, pdl=sel.pdl)
    else:
        parts, (out, lse) = _attend_tiered(q, inputs, sel, scale, vbar, stats)
    if not with_alpha:
        return out, lse
    # Summed after the merge is launched, so the merge still follows the partial kernel directly (PDL).
    return out, lse, None if parts.alpha is None else parts.alpha.sum(dim=1)


def _reallocating(parts: Partials, sel: Selection) -> Partials:
    """parts as the merge takes them: alpha summed for the coverage alone (coverage_inputs) must not reallocate."""
    return parts if sel.alpha_inputs is not None or parts.alpha is None else replace(parts, alpha=None)


def _attend_tiered(q: torch.Tensor, inputs: LayerInputs, sel: Selection, scale: float | None,
                   vbar: torch.Tensor | None, stats: tuple[torch.Tensor, ...] | None) -> tuple[
        Partials, tuple[torch.Tensor, torch.Tensor]]:
    store, csr, layer, view = inputs.store, inputs.csr, inputs.layer, inputs.view
    tiers: TierManager = store.tiers
    Hkv, P = inputs.num_kv_heads, csr.page_size
    BH = q.shape[0] * Hkv
    if sel.mode == MODE_DENSE:  # every page of every sequence, as a page list
        max_pages = max(-(-S // P) for S in csr.host_lens)
        items = torch.arange(max_pages, dtype=torch.int32, device=q.device).expand(BH, -1).contiguous()
        list_len = csr.page_counts().repeat_interleave(Hkv).int()
        mode = MODE_PAGES
    else:
        items, mode = sel.items, sel.mode
        list_len = sel.count if sel.count is not None else torch.full((BH,), items.shape[1], dtype=torch.int32,
                                                                      device=q.device)
    page_index, item_bytes = (items // P, 1) if mode == MODE_ROWS else (items, P)
    # Tier of each item, through the sequence's page table; items past list_len are ignored.
    starts = csr.indptr[:-1].repeat_interleave(Hkv)[:, None]
    live = torch.arange(items.shape[1], device=q.device)[None, :] < list_len[:, None]
    page_ids = csr.indices[(starts + page_index.clamp(min=0)).clamp(max=max(csr.indices.numel() - 1, 0)).long()]
    where = torch.where(live, tiers.tier_dev[page_ids.long()], -1)
    if sel.mode != MODE_DENSE and tiers.tracks_choices:  # a host sync: only for a policy that asks
        tiers.note_chosen(page_ids[live])
    slot_csr = PageTableCSR(csr.indptr, tiers.slot_dev[csr.indices.long()], csr.last_page_len, P, csr.host_lens)
    row_bytes = 2 * store.config.head_dim * store.config.itemsize
    pools = {DEVICE: (view.k_seq, view.v_seq)}
    checks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if HOST in tiers.storage:
        host = tiers.storage[HOST].data[layer]  # [N, 2, Hkv, P, d], pinned: the kernel reads it over PCIe
        pools[HOST] = (host[:, 0], host[:, 1])
        if tiers.verify_in_kernel:
            sums = tiers.storage[HOST].sums_on(q.device)[layer]  # [N, 2, Hkv, P]
            checks[HOST] = (sums[:, 0], sums[:, 1], torch.zeros(1, dtype=torch.int32, device=q.device))
    mine = {tier: where == tier for tier in pools}
    counts = {tier: m.sum(dim=1, dtype=torch.int32) for tier, m in mine.items()}
    totals = dict(zip(counts, torch.stack([c.sum() for c in counts.values()]).tolist()))  # one host sync
    cuda = q.device.type == "cuda"
    main = torch.cuda.current_stream(q.device) if cuda else None
    side = _side_stream(q.device) if cuda else None
    parts, joins = [], []
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
                                        item_list=mine_items, list_len=counts[tier], alpha_inputs=stats,
                                        scale=scale, row_sums=checks.get(tier)))
            if cuda and tier != DEVICE:
                for t in (parts[-1].out, parts[-1].lse, parts[-1].alpha):
                    if t is not None:  # made on the side stream, read by the merge on the main one
                        t.record_stream(main)
                done = torch.cuda.Event()
                done.record(stream)
                joins.append(done)
        if tier != DEVICE:
            inputs.moves.add(tier, totals[tier] * item_bytes * row_bytes)
    for done in joins:
        main.wait_event(done)
    merged = Partials.concat(parts)
    out = merge_partials(q, _reallocating(merged, sel), Hkv, vbar)
    for tier, (_, _, bad) in checks.items():
        if totals[tier] and int(bad):  # a host sync, only when the tier was read: no result leaves unchecked
            raise _failed_rows(tiers, tier, page_ids[mine[tier]])
    return merged, out


def _failed_rows(tiers: TierManager, tier: int, pages: torch.Tensor) -> Exception:
    """The PageCorrupted error for the pages among `pages` (ids, read in place from `tier`) whose rows fail their
    checksums, found again on the host; they are quarantined."""
    storage = tiers.storage[tier]
    failed = []
    for page in torch.unique(pages.cpu()).tolist():
        if not storage.rows_intact(int(tiers.slot[page])):
            failed.append(page)
    return tiers.corrupted(failed or torch.unique(pages.cpu()).tolist(), tier)
