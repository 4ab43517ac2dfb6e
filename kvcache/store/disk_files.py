"""The disk tier's files when they outlive the process (`--disk-dir`): page slots, row checksums, and an index of
the prefix-cache pages they hold, so a restarted store serves those pages again (docs/tiers.md, "Warm restart").

Files in the directory: `pages.bin` (slots `[L, N, 2, Hkv, P, d]`), `rows.bin` (row checksums `[L, N, 2, Hkv, P]`
int32), `index.bin` (one record per slot, below), `meta.json` (the shape the files hold) and `lock` (one store at a
time). All three data files are memory-mapped shared, so what a store wrote is in the files even if it is killed.

`meta.json` also names the model (`disk_namespace`): a prefix page is found by its token ids alone, so files
written for another model, even of the same shape, are started afresh rather than served.

A record is `[valid, hash_lo, hash_hi, crc32, page_index]` (int64): the page's chain hash in the prefix cache (16
bytes), the crc32 of its bytes and its index within its sequence. A record is marked valid only after the page's
bytes and row checksums are written, and unmarked before its slot is reused; a restarted store still verifies every
page against both checksums, so a torn write or a flipped bit is dropped, never served.
"""

from __future__ import annotations

import fcntl
import json
import os
import weakref

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter, StoreFull

FORMAT = 1
RECORD = 5  # int64 fields per slot: valid, hash_lo, hash_hi, crc32, page_index


class DiskFiles:
    """The memory-mapped files of a persistent disk tier of `num_slots` slots in `config.disk_path`."""

    def __init__(self, config: KVCacheConfig, num_slots: int) -> None:
        c = config
        self.directory = c.disk_path
        if not self.directory or not os.path.isdir(self.directory):
            raise InvalidParameter(f"disk directory {self.directory!r} is not a directory")
        self._lock_fd = os.open(os.path.join(self.directory, "lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise InvalidParameter(f"disk directory {self.directory} is in use by another kvcache store") from None
        # The lock goes with this object: released by close(), or when it is collected, or if opening fails.
        self._release = weakref.finalize(self, os.close, self._lock_fd)
        try:
            self.shape = (c.num_layers, num_slots, 2, c.num_kv_heads, c.page_size, c.head_dim)
            meta = {"format": FORMAT, "shape": list(self.shape), "dtype": str(c.dtype).removeprefix("torch."),
                    "namespace": c.disk_namespace}
            self.fresh_reason = self._fresh_reason(meta)  # None: the files hold pages of this shape and model
            if self.fresh_reason is not None:
                self._create(meta, c.itemsize)
            self.data = self._map("pages.bin", self.shape, c.dtype)
            self.row_sums = self._map("rows.bin", self.shape[:-1], torch.int32)
            self.index = self._map("index.bin", (num_slots, RECORD), torch.int64)
        except BaseException:
            self._release()
            raise

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _fresh_reason(self, meta: dict) -> str | None:
        try:
            with open(self._path("meta.json")) as f:
                found = json.load(f)
        except FileNotFoundError:
            return "no files yet"
        except (OSError, ValueError) as exc:
            return f"meta.json unreadable ({exc})"
        if found != meta:
            return f"the files hold {found}, this store needs {meta}"
        return None

    def _create(self, meta: dict, itemsize: int) -> None:
        if os.path.exists(self._path("meta.json")):  # first, so a failure below leaves files that start afresh
            os.unlink(self._path("meta.json"))
        numel = 1
        for n in self.shape:
            numel *= n
        for name, size in (("pages.bin", numel * itemsize), ("rows.bin", numel // self.shape[-1] * 4),
                           ("index.bin", self.shape[1] * RECORD * 8)):
            fd = os.open(self._path(name), os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
            try:
                # Reserve the blocks now: a write through the mapping into a full disk would be SIGBUS.
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise StoreFull(f"disk tier: cannot reserve {size} bytes in {self.directory}: {exc}") from None
            finally:
                os.close(fd)
        tmp = self._path("meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, self._path("meta.json"))  # last: files without meta.json are started afresh

    def _map(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        return torch.from_file(self._path(name), shared=True, size=numel, dtype=dtype).view(shape)

    def records(self) -> list[tuple[int, bytes, int, int]]:
        """(slot, chain hash, crc32, page index) of every slot marked valid."""
        valid = torch.nonzero(self.index[:, 0] == 1).flatten().tolist()
        out = []
        for slot in valid:
            _, lo, hi, crc, index = self.index[slot].tolist()
            digest = lo.to_bytes(8, "little", signed=True) + hi.to_bytes(8, "little", signed=True)
            out.append((slot, digest, crc, index))
        return out

    def persist(self, slot: int, digest: bytes, crc: int, page_index: int) -> None:
        """Mark `slot` as holding the prefix-cache page `digest` (its bytes and row checksums already written)."""
        lo = int.from_bytes(digest[:8], "little", signed=True)
        hi = int.from_bytes(digest[8:16], "little", signed=True)
        self.index[slot, 1:] = torch.tensor([lo, hi, crc, page_index])
        self.index[slot, 0] = 1  # after the fields: a record is valid only once whole

    def forget(self, slot: int) -> None:
        """Unmark `slot` (before it is reused or its page freed)."""
        self.index[slot, 0] = 0

    def close(self) -> None:
        """Release the directory's lock (the mappings stay valid until their tensors are dropped)."""
        self._release()
