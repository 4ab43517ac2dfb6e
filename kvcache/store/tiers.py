"""Slot storage of the lower tiers: pinned CPU memory (host) and a memory-mapped file (disk).

Both hold K and V of whole pages in one layout, `[L, N, 2, Hkv, P, d]`: a layer's K and V of
one page are adjacent (one contiguous block per page and layer, so a dense stream copies runs of
pages without a gather), and a row's K and V are gathered by one index.
"""

from __future__ import annotations

import os
import tempfile
import zlib

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter, StoreFull
from kvcache.store.disk_files import DiskFiles

DEVICE, HOST, DISK = 0, 1, 2
TIER_NAMES = ("device", "host", "disk")
NOWHERE = -1  # a page id that holds no K/V (free)


def pinned_available() -> bool:
    """Whether page-locked host memory can be allocated (it needs a CUDA runtime)."""
    return torch.cuda.is_available()


class SlotStorage:
    """Fixed number of page slots `[L, N, 2, Hkv, P, d]` with a free list; one tier's K/V."""

    def __init__(self, config: KVCacheConfig, num_slots: int, tier: int) -> None:
        c = config
        self.tier = tier
        self.num_slots = num_slots
        self.shape = (c.num_layers, num_slots, 2, c.num_kv_heads, c.page_size, c.head_dim)
        self.page_bytes = c.num_layers * 2 * c.num_kv_heads * c.page_size * c.head_dim * c.itemsize
        self.files: DiskFiles | None = None  # a disk tier that outlives the process (config.disk_persistent)
        if tier == DISK and c.disk_persistent:
            self.files = DiskFiles(c, num_slots)
            self.data, self.row_sums = self.files.data, self.files.row_sums
            # Slots of recorded prefix pages stay taken; the store verifies and adopts them, or releases them.
            held = {slot for slot, *_ in self.files.records()}
            self._free = [s for s in range(num_slots - 1, -1, -1) if s not in held]
            return
        if tier == HOST:
            self.data = torch.zeros(self.shape, dtype=c.dtype, pin_memory=pinned_available())
        elif tier == DISK:
            self.data = self._map_file(c, num_slots)
        else:
            raise InvalidParameter(f"tier {tier} has no slot storage")
        self._free = list(range(num_slots - 1, -1, -1))
        # A checksum per K/V row [L, N, 2, Hkv, P]: sparse reads check the rows they read, not whole pages. Pinned
        # with the host tier's rows: kernels that read those in place read their checksums too.
        self.row_sums = torch.zeros(self.shape[:-1], dtype=torch.int64, pin_memory=tier == HOST and pinned_available())

    def _map_file(self, c: KVCacheConfig, num_slots: int) -> torch.Tensor:
        directory = c.disk_path or tempfile.gettempdir()
        if not os.path.isdir(directory):
            raise InvalidParameter(f"disk_path {directory!r} is not a directory")
        numel = 1
        for n in self.shape:
            numel *= n
        fd, path = tempfile.mkstemp(prefix="kvcache-", suffix=".pages", dir=directory)
        try:
            # Reserve the blocks now: a sparse file that later runs out of space would kill the
            # process with SIGBUS on a write through the mapping, instead of raising here.
            os.posix_fallocate(fd, 0, numel * c.itemsize)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise StoreFull(f"disk tier: cannot reserve {numel * c.itemsize} bytes in {directory}: {exc}") from None
        os.close(fd)
        data = torch.from_file(path, shared=True, size=numel, dtype=c.dtype).view(self.shape)
        # The mapping keeps the file alive; unlinking now means no file outlives the process.
        os.unlink(path)
        return data

    @property
    def num_free(self) -> int:
        """Slots not holding a page."""
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot; raises StoreFull if none is left."""
        if not self._free:
            raise StoreFull(f"the {TIER_NAMES[self.tier]} tier is full ({self.num_slots} pages)")
        return self._free.pop()

    def release(self, slot: int) -> None:
        """Return a slot to the free list (a persistent one forgets the page it held first)."""
        if self.files is not None:
            self.files.forget(slot)
        self._free.append(slot)

    def page(self, slot: int) -> torch.Tensor:
        """K and V of one page in every layer [L, 2, Hkv, P, d] (a view into the storage)."""
        return self.data[:, slot]

    def checksum(self, slot: int) -> int:
        """crc32 of the page's bytes, layer by layer."""
        return page_checksum(self.page(slot))

    def write(self, slots: list[int], kv: torch.Tensor) -> None:
        """Store pages kv [L, n, 2, Hkv, P, d] (CPU) at `slots`, with their row checksums."""
        index = torch.tensor(slots)
        self.data[:, index] = kv
        self.row_sums[:, index] = row_checksums(kv)

    def copy_from(self, other: SlotStorage, src: int, dst: int) -> None:
        """Copy one page, with its row checksums, from slot `src` of another tier to slot `dst` of this one."""
        self.data[:, dst] = other.data[:, src]
        self.row_sums[:, dst] = other.row_sums[:, src]

    def layer_rows(self, layer: int) -> torch.Tensor:
        """One layer's rows as `[N * 2 * Hkv * P, d]`: row ((slot * 2 + kv) * Hkv + head) * P + r."""
        return self.data[layer].view(-1, self.shape[-1])


def page_checksum(page: torch.Tensor) -> int:
    """crc32 of a page's K/V bytes [L, 2, Hkv, P, d], chained over layers (each layer is contiguous)."""
    crc = 0
    for layer in page:
        crc = zlib.crc32(layer.contiguous().view(torch.uint8).numpy(), crc)
    return crc


_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def row_checksums(rows: torch.Tensor) -> torch.Tensor:
    """A checksum of each row of rows [..., d] (int64 [...]): the row's bytes as 32-bit words, each times an odd
    weight, summed modulo 2^64. Any change within a single word changes it (an odd weight times a nonzero
    difference below 2^32 is never a multiple of 2^64); vectorised, and computed on whichever device holds the
    rows, so sparse reads check only their rows, where they are used."""
    words = rows.contiguous().view(torch.int32).to(torch.int64)  # [..., d * itemsize / 4]
    key = (words.shape[-1], words.device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = (torch.arange(words.shape[-1], dtype=torch.int64, device=words.device) * 2 + 1) * 0x9E3779B1
    return (words * _WEIGHTS[key]).sum(-1)
