"""Programmatic dependent launch (Hopper and later): a kernel that follows another of the same decode step may be
launched while that one finishes, so its launch and its first loads overlap the other's tail.

A kernel launched this way (`pdl_launch(True)`) must call `pdl_wait` before it writes anything, and before it
reads what an earlier kernel of the step wrote; before the wait it may read only what existed when the step's
first kernel (launched the usual way) began, such as the page table and the store's pools. Every kernel of a
chain calls `pdl_trigger` first, which lets the next launch as soon as all its programs have started; the
chain's first kernel calls it too but is launched the usual way. A kernel's PDL constexpr says whether its
step uses dependent launches; False (the Triton interpreter, GPUs before sm_90, steps too large to gain:
pdl_for_rows) compiles both calls away.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch: CUDA sm_90+, compiled (not
    interpreted), and a Triton that has grid dependency control."""
    return (device.type == "cuda" and gdc_wait is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and _capable(device.index if device.index is not None else torch.cuda.current_device()))


# Dependent launches pay where a step's kernels leave most SMs idle. The gate's step at 128K on an H100, same code
# with and without them: 54.0 -> 51.0 us with 8 rows (batch 1, 8 kv heads; bench/results/pdl_off_on_h100.json),
# but 182.5 -> 194.0 us with 64 (batch 8; bench/results/pdl_rows_ab_h100.json), likely because the next kernel's
# early programs then take SM slots the running one still needs.
PDL_MAX_ROWS = 8


def pdl_for_rows(device: torch.device, rows: int) -> bool:
    """Whether a decode step over `rows` (sequence, kv head) rows launches its kernels dependent
    (kvcache.kernels.pdl)."""
    return rows <= PDL_MAX_ROWS and pdl_enabled(device)


def pdl_launch(on: bool) -> dict:
    """The launch keywords of a kernel that follows another of its chain: launch_pdl when `on`."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible (no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel of the chain launch once every program of this one has started (no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()
