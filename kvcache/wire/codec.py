"""Tensors <-> wire Tensor messages (raw little-endian bytes, dtype, shape), with strict checks."""

from __future__ import annotations

import math

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


def to_wire(t: torch.Tensor) -> pb.Tensor:
    """A Tensor message holding t's values (copied to the CPU, contiguous)."""
    if t.dtype not in _NAMES:
        raise DTypeMismatch(f"dtype {t.dtype} cannot travel; supported: {sorted(DTYPES)}")
    t = t.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=_NAMES[t.dtype], shape=list(t.shape), data=data)


def from_wire(msg: pb.Tensor, name: str = "tensor") -> torch.Tensor:
    """The tensor a message holds; ShapeMismatch / DTypeMismatch name what is malformed."""
    if msg.dtype not in DTYPES:
        raise DTypeMismatch(f"{name}: dtype {msg.dtype!r} unknown; supported: {sorted(DTYPES)}")
    shape = tuple(msg.shape)
    if any(s < 0 for s in shape):
        raise ShapeMismatch(f"{name}: negative dimension in shape {shape}")
    dtype = DTYPES[msg.dtype]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != expected:
        raise ShapeMismatch(f"{name}: {len(msg.data)} bytes for shape {shape} of {msg.dtype} ({expected} expected)")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)
