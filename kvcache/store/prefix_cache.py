"""The prefix cache's hash chain over a sequence's pages: registering full pages, finding a prompt's cached ones."""

from __future__ import annotations

from kvcache.store.allocator import PageAllocator, chain_hash
from kvcache.store.page_table import SequenceState


def register_full_pages(allocator: PageAllocator, seq: SequenceState, page_size: int) -> list[int]:
    """Hash the sequence's full pages (full in every layer, with known token ids) into the prefix cache; returns
    the pages newly hashed."""
    P = page_size
    full = min(min(seq.lengths), len(seq.token_ids)) // P
    pages = []
    while seq.num_hashed_pages < full:
        i = seq.num_hashed_pages
        seq.last_hash = chain_hash(seq.last_hash, seq.token_ids[i * P : (i + 1) * P])
        pages.append(int(seq.pages[i]))
        allocator.register(pages[-1], seq.last_hash, i)
        seq.num_hashed_pages += 1
    return pages


def acquire_prefix(allocator: PageAllocator, token_ids: list[int], root: bytes, page_size: int) -> tuple[list[int],
                                                                                                       bytes]:
    """Cached pages of the leading full pages of `token_ids` (at least one token is left to compute), each taken
    (a reference acquired), and the chain's hash after the last; the chain starts from `root`."""
    P = page_size
    pages: list[int] = []
    digest = root
    for i in range((len(token_ids) - 1) // P):
        nxt = chain_hash(digest, token_ids[i * P : (i + 1) * P])
        page = allocator.lookup(nxt)
        if page is None:
            break
        allocator.acquire_cached(page)
        pages.append(page)
        digest = nxt
    return pages, digest
