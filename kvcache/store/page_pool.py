"""PagePool: the preallocated page tensors (both key layouts, values, key summaries)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.config import SUMMARY_DTYPE, KVCacheConfig

# Rows of k_summary along its third axis.
from kvcache.kernels.csr import SUMMARY_MAX, SUMMARY_MEAN, SUMMARY_MIN  # noqa: F401 (the layout, re-exported)
from kvcache.store.host_copy import to_device_async
from kvcache.store.shared_segment import CudaSegment, Region, SharedSegment, layout


@dataclass(frozen=True)
class RowTargets:
    """Where a decode step's new rows go, as append_rows indexes the pool: page ids, device slots and rows in the page
    [B] (int64), the running mean's weights [B, 2] (s / (s + 1), 1 / (s + 1)), and the sequences whose row opens
    its page."""

    page_ids: torch.Tensor
    kv_slots: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    first: list[int]


class PagePool:
    """Device page storage; a page id names the same positions in every layer.

    Layouts (docs/architecture.md):
      k_seq     [L, Nkv, Hkv, P, d]  sequence-major keys (stage-2 rows, dense attention)
      k_dim     [L, N, Hkv, d, P]    dim-major keys (SparQ stage 1 reads r runs of P), a view of [L, Hkv, d, N, P]
                                     memory: one key dim of consecutive page ids is one run
      v_seq     [L, Nkv, Hkv, P, d]
      k_summary [L, N, Hkv, 3, d]    float32 min / max / mean of the page's filled key rows

    k_dim and k_summary are indexed by page id (N = config.total_pages: they stay on the device
    whatever tier holds the page); k_seq and v_seq by device slot (Nkv = config.device_pages). A
    store without lower tiers uses slot = page id.

    k_dim's memory puts the page axis next to the positions: a sequence whose pages have consecutive ids
    (a prefill's pages do, see PageAllocator.allocate) has each key dim in one run of P * pages values, so
    stage 1 reads long runs at any page size, where a page-major layout gave runs of P (32 bytes at
    P=16 in bf16; docs/architecture.md, "Key layouts").
    """

    def __init__(self, config: KVCacheConfig, segment: SharedSegment | CudaSegment | None = None) -> None:
        """Zeroed page tensors on config.device; or, given `segment` (shared memory, or GPU memory shared by CUDA IPC),
        views of it laid out by PagePool.regions: how a server's pool and an engine that maps it see the same pages."""
        c = config
        self.config = c
        self.num_pages = c.total_pages
        self.segment = segment
        if segment is None:
            k_seq, k_dim, v_seq, k_summary = (torch.zeros(r.shape, dtype=r.dtype, device=c.device)
                                              for r in self.regions(c)[0])
        else:
            if c.tiered or (c.device.type == "cuda") != isinstance(segment, CudaSegment):
                raise ValueError("only an untiered store's pool can be shared, in a segment on its device")
            k_seq, k_dim, v_seq, k_summary = (segment.tensor(r) for r in self.regions(c)[0])
        self.k_seq, self.v_seq, self.k_summary = k_seq, v_seq, k_summary
        self.k_dim = k_dim.permute(0, 3, 1, 2, 4)

    @staticmethod
    def regions(config: KVCacheConfig) -> tuple[list[Region], int]:
        """Where k_seq, k_dim (in memory order), v_seq and k_summary lie in a shared segment, and its bytes."""
        c = config
        shape_seq = (c.num_layers, c.device_pages, c.num_kv_heads, c.page_size, c.head_dim)
        shape_dim = (c.num_layers, c.num_kv_heads, c.head_dim, c.total_pages, c.page_size)  # memory order
        shape_summary = (c.num_layers, c.total_pages, c.num_kv_heads, 3, c.head_dim)
        return layout([(shape_seq, c.dtype), (shape_dim, c.dtype), (shape_seq, c.dtype),
                       (shape_summary, SUMMARY_DTYPE)])

    def write(
        self,
        layers: torch.Tensor,
        page_ids: torch.Tensor,
        kv_slots: torch.Tensor,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Scatter k, v [nl, T, Hkv, d] to (layers[nl], page_ids[T] / kv_slots[T], slots[T]) in both key layouts."""
        li = layers[:, None]  # [nl, 1] broadcasts against [T]
        pi = page_ids[None, :]
        ki = kv_slots[None, :]
        si = slots[None, :]
        # Advanced indices separated by a slice put their broadcast dims [nl, T] first.
        self.k_seq[li, ki, :, si] = k
        self.v_seq[li, ki, :, si] = v
        self.k_dim[li, pi, :, :, si] = k

    def refresh_summaries(
        self, layers: torch.Tensor, page_ids: torch.Tensor, kv_slots: torch.Tensor, fills: torch.Tensor
    ) -> None:
        """Recompute min/max/mean of pages `page_ids[n]` (at device slots kv_slots[n]) over their first
        `fills[nl, n]` rows."""
        keys = self.k_seq[layers[:, None], kv_slots[None, :]].float()  # [nl, n, Hkv, P, d]
        filled = torch.arange(self.config.page_size, device=keys.device) < fills[..., None]  # [nl, n, P]
        filled = filled[:, :, None, :, None]
        inf = torch.tensor(float("inf"), device=keys.device)
        kmin = torch.where(filled, keys, inf).amin(dim=3)
        kmax = torch.where(filled, keys, -inf).amax(dim=3)
        count = fills.clamp(min=1)[:, :, None, None].to(keys.dtype)
        kmean = torch.where(filled, keys, 0.0).sum(dim=3) / count
        self.k_summary[layers[:, None], page_ids[None, :]] = torch.stack((kmin, kmax, kmean), dim=3)

    def set_page_keys(self, page_id: int, k: torch.Tensor) -> None:
        """The dim-major keys and summaries of a full page from its keys k [L, Hkv, P, d] (any device): what a page
        adopted from a lower tier needs on the device (k_seq stays where the page lies)."""
        k = k.to(self.k_dim.device)
        self.k_dim[:, page_id] = k.transpose(-1, -2)
        keys = k.float()
        self.k_summary[:, page_id] = torch.stack((keys.amin(dim=2), keys.amax(dim=2), keys.mean(dim=2)), dim=2)

    @staticmethod
    def row_targets(rows: list[tuple[int, int, int]], device: torch.device) -> RowTargets:
        """append_rows' index tensors for `rows` on `device`: a planned step makes them once for all its layers."""
        page_ids, kv_slots, slots = to_device_async(torch.tensor(rows, dtype=torch.long).T.contiguous(), device)
        weights = to_device_async(torch.tensor([(s / (s + 1), 1 / (s + 1)) for _, _, s in rows],
                                               dtype=SUMMARY_DTYPE), device)
        return RowTargets(page_ids, kv_slots, slots, weights, [b for b, (_, _, s) in enumerate(rows) if s == 0])

    def append_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: list[tuple[int, int, int]],
                    targets: RowTargets | None = None) -> None:
        """One new row per sequence at `layer` (a decode step): k, v [B, Hkv, d] to rows[b] = (page id, device
        slot of its K/V, row in the page) in both key layouts, folded into the pages' summaries; `targets`, if
        given, are row_targets(rows).

        A page's first row (row 0) sets min = max = mean; a later one at row s updates min, max and the
        running mean (mean * s + k) / (s + 1) instead of re-reducing the page. Reference of
        kvcache.kernels.append_rows."""
        t = targets or self.row_targets(rows, k.device)
        self.k_seq[layer, t.kv_slots, :, t.slots] = k
        self.v_seq[layer, t.kv_slots, :, t.slots] = v
        self.k_dim[layer, t.page_ids, :, :, t.slots] = k
        kf = k.float()
        summary = self.k_summary[layer, t.page_ids]  # [B, Hkv, 3, d], a copy
        torch.minimum(summary[:, :, SUMMARY_MIN], kf, out=summary[:, :, SUMMARY_MIN])
        torch.maximum(summary[:, :, SUMMARY_MAX], kf, out=summary[:, :, SUMMARY_MAX])
        summary[:, :, SUMMARY_MEAN].mul_(t.weights[:, 0, None, None]).add_(kf * t.weights[:, 1, None, None])
        if t.first:  # a page's first row: whatever the page held before is gone
            summary[t.first] = kf[t.first, :, None, :].expand(-1, -1, 3, -1)
        self.k_summary[layer, t.page_ids] = summary

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor, src_kv: torch.Tensor, dst_kv: torch.Tensor) -> None:
        """Copy pages src[n] -> dst[n] (device slots src_kv -> dst_kv) in every layer and layout (copy-on-write)."""
        for pool in (self.k_dim, self.k_summary):
            pool[:, dst] = pool[:, src]
        for pool in (self.k_seq, self.v_seq):
            pool[:, dst_kv] = pool[:, src_kv]
