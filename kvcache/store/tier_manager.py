"""TierManager: where each page's K/V lives (device, host, disk), moves between tiers, and reads from them.

Placement policy (docs/tiers.md): `k_dim` and the page summaries of
every page id stay on the device (PagePool indexes them by page id), so SparQ stage 1 and page
scoring never leave it; `k_seq` and `v_seq` of a page live in exactly one tier, at a slot of that
tier. The last `pinned_tail_pages` pages of every live sequence stay on the device. Victims go
down by the eviction policy (LRU by default): device -> host -> disk.

Moves lose nothing: the destination is written and the copy finished before the source slot is
released; a crc32 of the page's bytes is kept while the page is off the device and checked when
the page is read back whole (a reload, a move to disk); a mismatch raises PageCorrupted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import PageCorrupted, StoreFull
from kvcache.stats import Totals
from kvcache.store.eviction import EvictionPolicy, LRUPolicy, SparseAwarePolicy
from kvcache.store.page_pool import PagePool
from kvcache.store.tiers import DEVICE, DISK, HOST, NOWHERE, TIER_NAMES, SlotStorage


def pair(dst: int, src: int) -> str:
    """Name of a transfer direction, e.g. 'device<-host'."""
    return f"{TIER_NAMES[dst]}<-{TIER_NAMES[src]}"


class TierManager:
    """Tier and slot of every page id, the lower tiers' storage, and the bytes moved between tiers."""

    def __init__(self, config: KVCacheConfig, pool: PagePool, policy: EvictionPolicy | None = None) -> None:
        c = config
        self.config = c
        self.pool = pool
        if policy is None:
            policy = SparseAwarePolicy() if c.eviction == "sparse" else LRUPolicy()
        self.policy: EvictionPolicy = policy
        total = c.total_pages
        self.tier = torch.full((total,), NOWHERE, dtype=torch.int8)
        self.slot = torch.full((total,), -1, dtype=torch.int32)
        # Device copies of the two tables, for kernels that split a page list by tier.
        self.tier_dev = self.tier.to(c.device)
        self.slot_dev = self.slot.to(c.device)
        self._device_free = list(range(c.device_pages - 1, -1, -1))
        self.storage: dict[int, SlotStorage] = {}
        if c.host_pages:
            self.storage[HOST] = SlotStorage(c, c.host_pages, HOST)
        if c.disk_pages:
            self.storage[DISK] = SlotStorage(c, c.disk_pages, DISK)
        self._host_lru: OrderedDict[int, None] = OrderedDict()  # host-resident pages, oldest first
        self.checksums: dict[int, int] = {}
        self.quarantined: set[int] = set()  # pages whose rows failed their checksum: never served again
        self.moved = Totals(("bytes", "pages"))  # per direction, e.g. 'host<-device'
        # Kernels reading pinned host rows in place check each row's checksum as they go (docs/tiers.md); the
        # offload benchmark turns it off to time the check in the same run.
        self.verify_in_kernel = c.verify_host_reads
        self.owner_of: Callable[[int], str] = lambda page: "?"  # the store names sequences in errors
        # (chain hash, page index) of a page in the prefix cache, or None: a persistent disk tier records those.
        self.prefix_key_of: Callable[[int], tuple[bytes, int] | None] = lambda page: None

    # ---- bookkeeping ----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Pages per tier, free slots per tier, pages quarantined."""
        t = self.tier
        out = {f"pages_{TIER_NAMES[i]}": int((t == i).sum()) for i in (DEVICE, HOST, DISK)}
        out["free_device"] = len(self._device_free)
        for tier_id, s in self.storage.items():
            out[f"free_{TIER_NAMES[tier_id]}"] = s.num_free
        out["pages_quarantined"] = len(self.quarantined)
        return out

    def device_slots(self, pages: torch.Tensor) -> torch.Tensor:
        """Device slots of device-resident pages (int64, on the pool's device)."""
        return self.slot_dev[pages.to(self.slot_dev.device).long()].long()

    def _set(self, pages: list[int], tier: int, slots: list[int]) -> None:
        idx = torch.tensor(pages, dtype=torch.long)
        self.tier[idx] = tier
        self.slot[idx] = torch.tensor(slots, dtype=torch.int32)
        dev_idx = idx.to(self.tier_dev.device)
        self.tier_dev[dev_idx] = tier
        self.slot_dev[dev_idx] = self.slot[idx].to(self.slot_dev.device)

    def _release_slot(self, page: int) -> None:
        tier, slot = int(self.tier[page]), int(self.slot[page])
        if tier == DEVICE:
            self._device_free.append(slot)
            self.policy.forget([page])
        elif tier != NOWHERE:
            self.storage[tier].release(slot)
            self._host_lru.pop(page, None)
            self.checksums.pop(page, None)

    def drop(self, pages: list[int]) -> None:
        """Pages were freed: their slots return to their tiers."""
        for p in pages:
            self._release_slot(p)
        if pages:
            self._set(pages, NOWHERE, [-1] * len(pages))

    # ---- placement --------------------------------------------------------------------------------

    def place_new(self, pages: list[int], pinned: set[int]) -> None:
        """Give fresh page ids device slots (their earlier contents, if any, are dropped)."""
        self.drop([p for p in pages if int(self.tier[p]) != NOWHERE])
        self.make_room(len(pages), pinned | set(pages))
        slots = [self._device_free.pop() for _ in pages]
        self._set(pages, DEVICE, slots)
        self.policy.touch(pages)

    def room_check(self, n: int, pinned: set[int]) -> None:
        """Raise StoreFull (changing nothing) unless n device slots can be freed by evicting unpinned pages."""
        short = n - len(self._device_free)
        if short <= 0:
            return
        victims = len(self.policy.victims(short, pinned))
        below = sum(s.num_free for s in self.storage.values())
        if victims < short or below < short:
            raise StoreFull(
                f"need {n} device pages: {len(self._device_free)} free, {victims} evictable, "
                f"{below} free below the device"
            )

    def make_room(self, n: int, pinned: set[int]) -> None:
        """Evict unpinned device pages until n device slots are free."""
        self.room_check(n, pinned)
        short = n - len(self._device_free)
        if short > 0:
            self.move_down(self.policy.victims(short, pinned))

    def move_down(self, pages: list[int]) -> None:
        """Move device-resident pages to the host tier (or disk if there is no host tier)."""
        if not pages:
            return
        target = HOST if HOST in self.storage else DISK
        if target == HOST and self.storage[HOST].num_free < len(pages) and DISK in self.storage:
            need = len(pages) - self.storage[HOST].num_free
            self._host_to_disk(list(self._host_lru)[:need])
        dst = self.storage[target]
        if dst.num_free < len(pages):
            raise StoreFull(f"the {TIER_NAMES[target]} tier has {dst.num_free} free pages; {len(pages)} must go down")
        src_slots = self.device_slots(torch.tensor(pages))
        pool = self.pool
        # One gather on the device and one copy down; the copy into pageable or pinned host
        # memory is synchronous here, so the data is down before any source slot is released.
        kv = torch.stack((pool.k_seq[:, src_slots], pool.v_seq[:, src_slots]), dim=2).cpu()  # [L, n, 2, Hkv, P, d]
        slots = [dst.allocate() for _ in pages]
        dst.write(slots, kv)
        for p, s in zip(pages, slots):
            self.checksums[p] = dst.checksum(s)
            if target == HOST:
                self._host_lru[p] = None
            else:
                self._persist(p, s)
        for p in pages:
            self._device_free.append(int(self.slot[p]))
        self.policy.forget(pages)
        self._set(pages, target, slots)
        self.moved.add(pair(target, DEVICE), bytes=len(pages) * dst.page_bytes, pages=len(pages))

    def _host_to_disk(self, pages: list[int]) -> None:
        host, disk = self.storage[HOST], self.storage[DISK]
        if disk.num_free < len(pages):
            raise StoreFull(f"the disk tier has {disk.num_free} free pages; {len(pages)} must go down from the host")
        for p in pages:  # one page at a time, so a corrupted page stops the moves with the tables right
            hs = int(self.slot[p])
            self._verify(p, host, hs)
            ds = disk.allocate()
            disk.copy_from(host, hs, ds)
            if disk.checksum(ds) != self.checksums[p]:
                disk.release(ds)
                raise PageCorrupted(f"page {p} ({self.owner_of(p)}) changed while written to the disk tier")
            host.release(hs)
            self._host_lru.pop(p, None)
            self._set([p], DISK, [ds])
            self._persist(p, ds)
            self.moved.add(pair(DISK, HOST), bytes=host.page_bytes, pages=1)

    def _persist(self, page: int, slot: int) -> None:
        """Record a prefix-cache page that reached a persistent disk tier, so a restarted store finds it."""
        files = self.storage[DISK].files
        key = self.prefix_key_of(page) if files is not None else None
        if key is not None:
            files.persist(slot, key[0], self.checksums[page], key[1])

    def record_prefix(self, pages: list[int]) -> None:
        """Pages just hashed into the prefix cache: those already on a persistent disk tier are recorded there."""
        if DISK in self.storage and self.storage[DISK].files is not None:
            for page in pages:
                if int(self.tier[page]) == DISK:
                    self._persist(page, int(self.slot[page]))

    def persist_prefix(self) -> int:
        """At shutdown: record every prefix-cache page on a persistent disk tier, and copy there those still on the
        device or the host while free slots last (leading pages of a prompt first: a prefix is found from its
        start). Returns the pages recorded. The tables no longer describe the pages afterwards: close the store."""
        disk = self.storage.get(DISK)
        if disk is None or disk.files is None:
            return 0
        for page in torch.nonzero(self.tier == DISK).flatten().tolist():
            self._persist(page, int(self.slot[page]))
        up = torch.nonzero((self.tier == DEVICE) | (self.tier == HOST)).flatten().tolist()
        above = [(key[1], page) for page in up if (key := self.prefix_key_of(page)) is not None]
        for _, page in sorted(above)[: disk.num_free]:
            try:
                kv = self.page_kv(page)  # checked against its checksum if it is on the host
            except PageCorrupted:
                continue
            slot = disk.allocate()
            disk.write([slot], kv[:, None])
            self.checksums[page] = disk.checksum(slot)
            key = self.prefix_key_of(page)
            disk.files.persist(slot, key[0], self.checksums[page], key[1])
        return int((disk.files.index[:, 0] == 1).sum())

    def adopt(self, page: int, tier: int, slot: int, checksum: int) -> None:
        """Make `page` the holder of the K/V already in `slot` of a lower tier (a page found at start)."""
        self.checksums[page] = checksum
        self._set([page], tier, [slot])

    def verify_all(self) -> tuple[int, list[int]]:
        """A scrub: every page on a lower tier checked against its page checksum and its rows' checksums. Returns
        (pages checked, pages that failed); the failed ones are quarantined."""
        checked, failed = 0, []
        for tier, storage in self.storage.items():
            pages = torch.nonzero(self.tier == tier).flatten().tolist()
            for page in pages:
                checked += 1
                slot = int(self.slot[page])
                if not storage.rows_intact(slot) or storage.checksum(slot) != self.checksums.get(page):
                    failed.append(page)
        self.quarantined.update(failed)
        return checked, failed

    def corrupted(self, pages: list[int], tier: int) -> PageCorrupted:
        """The error for `pages` whose rows failed their checksum on `tier`, quarantined from now on."""
        self.quarantined.update(pages)
        names = ", ".join(f"page {p} of {self.owner_of(p)}" for p in pages[:4]) + (" ..." if len(pages) > 4 else "")
        return PageCorrupted(f"{names} on the {TIER_NAMES[tier]} tier failed its row checksums; its K/V cannot be "
                             f"trusted and is not served")

    def _verify(self, page: int, storage: SlotStorage, slot: int) -> None:
        if storage.checksum(slot) != self.checksums[page]:
            raise PageCorrupted(
                f"page {page} of {self.owner_of(page)} on the {TIER_NAMES[storage.tier]} tier failed its "
                f"checksum (crc32); its K/V cannot be trusted"
            )

    def bring_up(self, pages: list[int], pinned: set[int]) -> None:
        """Move pages to the device (a reload or a prefetch), verifying each page's checksum first."""
        pages = [p for p in dict.fromkeys(pages) if int(self.tier[p]) not in (DEVICE, NOWHERE)]
        if not pages:
            return
        for p in pages:  # every check before any move
            self._verify(p, self.storage[int(self.tier[p])], int(self.slot[p]))
        self.make_room(len(pages), pinned | set(pages))
        pool = self.pool
        for p in pages:
            tier, s = int(self.tier[p]), int(self.slot[p])
            page = self.storage[tier].page(s)  # [L, 2, Hkv, P, d]
            ds = self._device_free.pop()
            pool.k_seq[:, ds] = page[:, 0].to(pool.k_seq.device)
            pool.v_seq[:, ds] = page[:, 1].to(pool.v_seq.device)
            self.storage[tier].release(s)
            self._host_lru.pop(p, None)
            self.checksums.pop(p)
            self._set([p], DEVICE, [ds])
            self.moved.add(pair(DEVICE, tier), bytes=self.storage[tier].page_bytes, pages=1)
        self.policy.touch(pages)

    @property
    def tracks_choices(self) -> bool:
        """Whether the policy wants to hear which pages sparse attention chose (a sparse-aware policy)."""
        return hasattr(self.policy, "chosen")

    def note_chosen(self, pages: torch.Tensor) -> None:
        """Tell a sparse-aware policy which pages a sparse method read from (ids, any device)."""
        if self.tracks_choices:
            self.policy.chosen(torch.unique(pages.flatten()).tolist())

    def page_kv(self, page: int) -> torch.Tensor:
        """K/V of one page in every layer [L, 2, Hkv, P, d] from whichever tier holds it (a copy on the host); a page
        on a lower tier is checked against its checksum first (PageCorrupted)."""
        tier, s = int(self.tier[page]), int(self.slot[page])
        if tier == DEVICE:
            return torch.stack((self.pool.k_seq[:, s], self.pool.v_seq[:, s]), dim=1).cpu()
        if self.storage[tier].checksum(s) != self.checksums.get(page):
            raise self.corrupted([page], tier)
        return self.storage[tier].page(s).clone()
