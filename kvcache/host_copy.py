"""Host-to-device copies of small CPU tensors (page tables, row addresses) that do not wait on the GPU."""

from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (CPU) on `device`. For CUDA it is staged in pinned memory and copied without blocking.

    A copy from pageable memory makes the host wait until the stream has run everything queued
    before it, so a decode step that builds a page table would wait for the previous layer's
    kernels. The caching host allocator keeps the pinned stage until the copy has run."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
