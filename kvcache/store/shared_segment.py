"""SharedSegment: anonymous shared memory (a Linux memfd) that tensors are laid out in, and that another process on
the host maps from its file descriptor (docs/wire-protocol.md, "Shared pool").

A memfd has no name in any file system: only a process handed the descriptor (over the authenticated Unix socket
of the local data plane, SCM_RIGHTS) can map it, where a file in /dev/shm could be opened by anyone who guesses its
name and has the permissions.
"""

from __future__ import annotations

import mmap
import os
import socket
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes: every tensor of a segment starts on a cache line


@dataclass(frozen=True)
class Region:
    """Where one tensor lies in a segment: a byte offset, a shape and a dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """The region's size in bytes."""
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def layout(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[Region], int]:
    """Regions for tensors of `specs` [(shape, dtype)] one after the other, each aligned; and the total bytes."""
    regions, offset = [], 0
    for shape, dtype in specs:
        region = Region(offset, tuple(shape), dtype)
        regions.append(region)
        offset += -(-region.nbytes // ALIGN) * ALIGN
    return regions, max(offset, ALIGN)


def shared_memory_supported() -> bool:
    """Whether this host can make and pass shared segments (Linux memfd and SCM_RIGHTS)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


class SharedSegment:
    """`nbytes` of shared memory, mapped read-write into this process; new (zeroed), keeping its descriptor to hand
    out, or mapped from another's descriptor `fd`, which it takes and closes (the mapping keeps the memory)."""

    def __init__(self, nbytes: int, fd: int | None = None, name: str = "kvcache") -> None:
        owner = fd is None
        if owner:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, nbytes)  # pages are allocated (zeroed) as they are first touched
        try:
            if (held := os.fstat(fd).st_size) < nbytes:
                raise ValueError(f"the shared segment holds {held} bytes, not the {nbytes} expected")
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if not owner:
            os.close(fd)
            fd = -1
        self.fd = fd
        self.nbytes = nbytes
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def tensor(self, region: Region) -> torch.Tensor:
        """The tensor of `region`, a view of the shared memory (writes are seen by every process mapping it)."""
        return self._bytes[region.offset : region.offset + region.nbytes].view(region.dtype).view(region.shape)

    def close(self) -> None:
        """Close the descriptor; the memory stays mapped until this object and every view of it are gone."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CudaSegment:
    """`nbytes` of GPU memory that another process on the host maps through CUDA IPC; new (zeroed) or opened from
    `handle`, what handle() of the owner's segment gave (Region views, as SharedSegment).

    The IPC handle names the allocation; like a memfd it reaches only a process it is handed to (over the local data
    plane's authenticated socket). GPU work on the memory is ordered between the processes by IPC events
    (kvcache.store.shared_segment.SharedEvent), not by the host."""

    fd = -1  # no descriptor: the handle travels in the offer

    def __init__(self, nbytes: int, device: torch.device, handle: tuple | None = None) -> None:
        self.nbytes = nbytes
        self._handle: tuple | None = None
        if handle is None:
            self._bytes = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        else:
            storage = torch.UntypedStorage._new_shared_cuda(*handle)
            if storage.nbytes() < nbytes:
                raise ValueError(f"the shared GPU segment holds {storage.nbytes()} bytes, not the {nbytes} expected")
            self._bytes = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (nbytes,), (1,))

    def handle(self) -> tuple:
        """What another process passes to CudaSegment to map this memory: torch's CUDA IPC description of it, made
        once (making it swaps the storage's deleter: the owner calls this before the memory is in use)."""
        if self._handle is None:
            self._handle = self._bytes.untyped_storage()._share_cuda_()
        return self._handle

    def tensor(self, region: Region) -> torch.Tensor:
        """The tensor of `region`, a view of the shared GPU memory."""
        return self._bytes[region.offset : region.offset + region.nbytes].view(region.dtype).view(region.shape)

    def close(self) -> None:
        """Nothing to close: the memory is freed when this object and every view of it are gone."""


class SharedEvent:
    """A CUDA event two processes share: one records it after its GPU work on shared memory, the other's stream waits
    for it before touching that memory, with no host waiting on either side."""

    def __init__(self, device: torch.device, handle: bytes | None = None) -> None:
        if handle is None:
            self.event = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
            with torch.cuda.device(device):
                self.event.record()  # an event must be recorded once before its IPC handle exists
        else:
            self.event = torch.cuda.Event.from_ipc_handle(device, handle)
        self.device = device

    def handle(self) -> bytes:
        """The event's IPC handle."""
        return self.event.ipc_handle()

    def record(self) -> None:
        """Mark the end of the GPU work queued so far on the current stream."""
        self.event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        """Make the current stream wait for the other process's last record."""
        torch.cuda.current_stream(self.device).wait_event(self.event)
