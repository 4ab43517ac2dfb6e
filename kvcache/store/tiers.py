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
        self.device_sums: torch.Tensor | None = None  # the host tier's row checksums on the device (below)
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
        # A checksum per K/V row [L, N, 2, Hkv, P]: sparse reads check the rows they read, not whole pages.
        self.row_sums = torch.zeros(self.shape[:-1], dtype=torch.int32)
        # The host tier's row checksums also on the device (4 bytes a row: 1/64 of the rows' bytes at d=128 in bf16):
        # a kernel reading host rows in place over PCIe then reads their checksums from device memory, where one
        # more PCIe read per row cost SparQ 20% (docs/tiers.md).
        self.device_sums = self.row_sums.to(c.device) if tier == HOST and c.device.type == "cuda" else None

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
        self.row_sums[:, index] = sums = row_checksums(kv)
        if self.device_sums is not None:
            self.device_sums[:, index.to(self.device_sums.device)] = sums.to(self.device_sums.device)

    def copy_from(self, other: SlotStorage, src: int, dst: int) -> None:
        """Copy one page, with its row checksums, from slot `src` of another tier to slot `dst` of this one."""
        self.data[:, dst] = other.data[:, src]
        self.row_sums[:, dst] = other.row_sums[:, src]
        if self.device_sums is not None:
            self.device_sums[:, dst] = other.row_sums[:, src].to(self.device_sums.device)

    def rows_intact(self, slot: int) -> bool:
        """Whether every row of the page in `slot` matches its stored row checksum."""
        return bool((row_checksums(self.page(slot)) == self.row_sums[:, slot]).all())

    def sums_on(self, device: torch.device) -> torch.Tensor:
        """Row checksums [L, N, 2, Hkv, P] where reads on `device` find them fastest (the device copy if any)."""
        return self.device_sums if self.device_sums is not None and device.type == "cuda" else self.row_sums

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
    """A checksum of each row of rows [..., d] (int32 [...]): the row's elements as unsigned integers of their width
    (16 or 32 bits), each times an odd weight, summed modulo 2^32 (kernels compute the same on rows they read in
    place: kvcache.kernels.row_checksum). Any change within a single element changes it (an odd weight is
    invertible modulo 2^32, so it maps a nonzero difference to a nonzero one); vectorised, and computed on whichever
    device holds the rows, so sparse reads check only their rows, where they are used."""
    if rows.element_size() == 2:
        words = rows.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    else:  # 32-bit elements: a sign-extended word has the same low 32 bits in every product
        words = rows.contiguous().view(torch.int32).to(torch.int64)
    key = (words.shape[-1], words.device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = (torch.arange(words.shape[-1], dtype=torch.int64, device=words.device) * 2 + 1) * 0x9E3779B1
    total = (words * _WEIGHTS[key]).sum(-1)  # modulo 2^64; its low 32 bits are the sum modulo 2^32
    return ((total & 0xFFFFFFFF) - ((total & 0x80000000) << 1)).to(torch.int32)
