"""A store started on a persistent disk tier serves the prefix-cache pages a previous store left there: each page is
checked against its page and row checksums, then adopted as a cached page (docs/tiers.md, "Warm restart")."""

from __future__ import annotations

import torch

from kvcache.store.allocator import PageAllocator
from kvcache.store.page_pool import PagePool
from kvcache.store.tier_manager import TierManager
from kvcache.store.tiers import DISK


def restore_prefix_pages(allocator: PageAllocator, pool: PagePool, tiers: TierManager) -> tuple[list[int], int]:
    """Adopt the verified prefix pages of a persistent disk tier into a fresh store: returns the page ids adopted
    (cached, evictable, on the disk tier) and how many records were dropped (failed a checksum, or repeated a
    hash)."""
    disk = tiers.storage.get(DISK)
    if disk is None or disk.files is None:
        return [], 0
    adopted, dropped = [], 0
    for slot, digest, crc, index in disk.files.records():
        if not (disk.checksum(slot) == crc and disk.rows_intact(slot)) or allocator.lookup(digest) is not None:
            disk.release(slot)
            dropped += 1
            continue
        [page] = allocator.allocate(1)
        allocator.register(page, digest, index)
        tiers.adopt(page, DISK, slot, crc)
        pool.set_page_keys(page, disk.page(slot)[:, 0])
        allocator.release(torch.tensor([page]))  # no sequence holds it: cached and evictable, as a freed prefix is
        adopted.append(page)
    return adopted, dropped
