"""Tensors <-> wire Tensor messages (raw little-endian bytes, dtype, shape), with strict checks."""

from __future__ import annotations

import math

import numpy as np
import torch

from kvcache.errors import DTypeMismatch, ShapeMismatch
from kvcache.wire import kvcache_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "int8": torch.int8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
# numpy has no bfloat16: its bytes leave and arrive through a same-width integer view.
_NUMPY_VIEW = {torch.bfloat16: torch.int16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int16: np.int16, torch.int32: np.int32,
          torch.int64: np.int64, torch.int8: np.int8}

ERROR_CLASS_KEY = "kvcache-error"  # trailing metadata: the kvcache.errors class to raise client-side
MAX_DIMS = 8  # no kvcache tensor has more
MAX_DIM_SIZE = 2**31 - 1  # a larger dimension fits a message only beside a zero one, and no call wants it


def to_wire(t: torch.Tensor) -> pb.Tensor:
    """A Tensor message holding t's values (copied to the CPU, contiguous)."""
    msg = pb.Tensor()
    fill_wire(msg, t)
    return msg


def fill_wire(msg: pb.Tensor, t: torch.Tensor) -> bytes:
    """Write t's values into `msg`, an empty Tensor field of a message being built; returns the bytes written.

    As to_wire (copied to the CPU, contiguous), but in place: a Tensor message passed to its parent's constructor
    would be built, then copied."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise DTypeMismatch(f"dtype {t.dtype} cannot travel; supported: {sorted(DTYPES)}")
    # Each torch call costs a microsecond or two, and a decode step encodes ~150 small tensors per
    # side: skip the conversions a CPU, contiguous, grad-free tensor does not need.
    if not t.is_cpu or t.requires_grad or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    msg.dtype = name
    msg.shape.extend(t.shape)
    if not t.numel():
        return b""
    view = _NUMPY_VIEW.get(t.dtype)
    data = (t.view(view) if view is not None else t).numpy().tobytes()
    msg.data = data
    return data


def from_wire(msg: pb.Tensor, name: str = "tensor") -> torch.Tensor:
    """The tensor a message holds; ShapeMismatch / DTypeMismatch name what is malformed."""
    data = msg.data  # one read: each attribute read of a bytes field may copy it
    dtype, shape = _checked_layout(msg, len(data), name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    # bytearray: a view of immutable bytes would give a read-only tensor (and a warning). Shaped by numpy, so that
    # building the tensor is one torch call: a layer call decodes several, each torch call costs microseconds.
    view = _NUMPY_VIEW.get(dtype)
    array = np.frombuffer(bytearray(data), dtype=_NUMPY[view or dtype]).reshape(shape)
    return torch.from_numpy(array) if view is None else torch.from_numpy(array).view(dtype)


def _checked_layout(msg: pb.Tensor, nbytes: int, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """A message's dtype and shape, checked against its `nbytes` bytes of data; ShapeMismatch / DTypeMismatch name
    what is malformed."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise DTypeMismatch(f"{name}: dtype {msg.dtype!r} unknown; supported: {sorted(DTYPES)}")
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS:
        raise ShapeMismatch(f"{name}: {len(shape)} dimensions; at most {MAX_DIMS}")
    for s in shape:
        if s < 0:
            raise ShapeMismatch(f"{name}: negative dimension in shape {shape}")
        if s > MAX_DIM_SIZE:
            raise ShapeMismatch(f"{name}: dimension {s} in shape {shape} is larger than {MAX_DIM_SIZE}")
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise ShapeMismatch(f"{name}: {nbytes} bytes for shape {shape} of {msg.dtype} ({expected} expected)")
    return dtype, shape
