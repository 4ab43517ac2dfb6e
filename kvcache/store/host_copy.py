"""Host-to-device copies of small CPU tensors (page tables, row addresses) that do not wait on the GPU, and
the device check that skips a copy."""

from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t (CPU) on `device`. For CUDA it is staged in pinned memory and copied without blocking.

    A copy from pageable memory makes the host wait until the stream has run everything queued
    before it, so a decode step that builds a page table would wait for the previous layer's
    kernels. The caching host allocator keeps the pinned stage until the copy has run."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def host_buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty CPU tensor of n elements to fill and send to `device` by to_device_async: pinned when
    `device` is CUDA, so the send needs no staging copy."""
    return torch.empty(n, dtype=dtype, pin_memory=device.type == "cuda")


def ints_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """values as an int64 tensor on `device`, made straight in pinned memory for CUDA (one host op)."""
    return to_device_async(torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda"), device)


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether t is on `device` ("cuda" without an index means the current one): a no-op .to() still costs a
    dispatch, which a decode step pays per tensor and layer."""
    if t.device.type != device.type:
        return False
    return device.index is None or t.device.index == device.index
