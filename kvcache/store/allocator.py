"""PageAllocator: free list, reference counts and the prefix cache of full pages.

A freed page whose content hash is known stays matchable (vLLM's lazy eviction): it
goes to an LRU queue, and is only reused for new data once no plain free page is left.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from kvcache.errors import StoreFull

ROOT_HASH = b""


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Content hash of one full page: digest of (parent page's hash, this page's token ids)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class PageAllocator:
    """Hands out page ids, counts their references and remembers hashes of full pages."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refcount = torch.zeros(num_pages, dtype=torch.int32)
        # Pop from the end: low ids are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # refcount 0, hash known; LRU first
        self._page_of_hash: dict[bytes, int] = {}
        self._hash_of_page: dict[int, bytes] = {}
        self._index_of_page: dict[int, int] = {}  # a hashed page's index within its sequence (its chain depth)

    @property
    def num_free(self) -> int:
        """Pages that can be allocated now (plain free plus evictable cached ones)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (in use or evictable)."""
        return len(self._page_of_hash)

    def allocate(self, n: int) -> list[int]:
        """Take n pages with refcount 1; raises StoreFull (changing nothing) if fewer are free."""
        if n > self.num_free:
            raise StoreFull(f"need {n} free pages, only {self.num_free} of {self.num_pages} are free")
        take = min(n, len(self._free))
        pages = self._free[len(self._free) - take :][::-1]
        del self._free[len(self._free) - take :]
        while len(pages) < n:
            page, _ = self._cached_free.popitem(last=False)
            del self._page_of_hash[self._hash_of_page.pop(page)]
            self._index_of_page.pop(page, None)
            pages.append(page)
        self.refcount[pages] = 1
        return pages

    def share(self, pages: torch.Tensor) -> None:
        """Add one reference to each page (a fork)."""
        self.refcount.index_add_(0, pages.cpu().long(), torch.ones(len(pages), dtype=torch.int32))

    def release(self, pages: torch.Tensor) -> list[int]:
        """Drop one reference from each page; pages reaching zero become free (or evictable, if hashed).

        Returns the pages that became plain free: their contents are garbage from now on."""
        pages = pages.cpu().long()
        self.refcount.index_add_(0, pages, torch.full((len(pages),), -1, dtype=torch.int32))
        freed = []
        for page in pages[self.refcount[pages] == 0].tolist():
            if page in self._hash_of_page:
                self._cached_free[page] = None
            else:
                self._free.append(page)
                freed.append(page)
        return freed

    def register(self, page: int, digest: bytes, index: int = 0) -> None:
        """Record that `page` holds the full page with hash `digest`, the `index`-th page of its sequence (first
        writer wins)."""
        if digest not in self._page_of_hash and page not in self._hash_of_page:
            self._page_of_hash[digest] = page
            self._hash_of_page[page] = digest
            self._index_of_page[page] = index

    def key_of(self, page: int) -> tuple[bytes, int] | None:
        """(chain hash, index within its sequence) of a page in the prefix cache, or None."""
        digest = self._hash_of_page.get(page)
        return None if digest is None else (digest, self._index_of_page[page])

    def cached_pages(self) -> list[tuple[int, int]]:
        """(page, index within its sequence) of every page in the prefix cache."""
        return list(self._index_of_page.items())

    def lookup(self, digest: bytes) -> int | None:
        """The page holding `digest`, or None."""
        return self._page_of_hash.get(digest)

    def acquire_cached(self, page: int) -> None:
        """Take a reference on a page found by hash, reviving it if it was evictable."""
        if self.refcount[page] == 0:
            del self._cached_free[page]
        self.refcount[page] += 1
