"""PageTableCSR: the page tables of a batch for one layer, as every paged kernel takes them (FlashInfer's
indptr / indices / last_page_len), and the row order of the page key summaries the kernels read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows of a page's key summary [.., 3, d]: element-wise min, max and mean of its keys.
SUMMARY_MIN, SUMMARY_MAX, SUMMARY_MEAN = 0, 1, 2


@dataclass(frozen=True)
class PageTableCSR:
    """Page tables of a batch of sequences for one layer, as the paged kernels take them.

    indptr        [B + 1] int32: sequence b's pages are indices[indptr[b]:indptr[b + 1]]
    indices       [sum pages] int32: page ids, in position order
    last_page_len [B] int32: filled rows of each sequence's last page (1..P; 0 only for an empty sequence)
    """

    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    page_size: int
    host_lens: tuple[int, ...]  # S per sequence, kept on the host so kernels plan without a device sync

    @property
    def max_len(self) -> int:
        """Longest sequence in the batch."""
        return max(self.host_lens, default=0)

    @property
    def batch_size(self) -> int:
        """Number of sequences B."""
        return self.last_page_len.numel()

    def page_counts(self) -> torch.Tensor:
        """Pages of each sequence [B] (int64), on the page table's device."""
        return (self.indptr[1:] - self.indptr[:-1]).long()

    def seq_lens(self) -> torch.Tensor:
        """Cached positions S of each sequence [B] (int64)."""
        num_pages = self.page_counts()
        return torch.where(num_pages > 0, (num_pages - 1) * self.page_size + self.last_page_len.long(), 0)

    def page_indexes(self) -> torch.Tensor:
        """[len(indices)] int64: the index of each entry of `indices` within its own sequence (0, 1, ... per row)."""
        counts = self.page_counts()
        starts = torch.repeat_interleave(self.indptr[:-1].long(), counts)
        return torch.arange(len(self.indices), device=starts.device) - starts

    def pages_of(self, b: int) -> torch.Tensor:
        """Page ids of sequence b [n_pages] (int64, for indexing)."""
        return self.indices[self.indptr[b] : self.indptr[b + 1]].long()

