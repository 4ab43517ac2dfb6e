"""The tensor codec of the wire contract, and the grpc core settings applied before grpc loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvcache.errors import DTypeMismatch, ShapeMismatch
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.codec import DTYPES, fill_wire, from_wire, to_wire
from kvcache.wire.transport import LOW_LATENCY_EXPERIMENTS


def _sample(dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)


CASES = [(name, layout) for name in sorted(DTYPES)
         for layout in ("contiguous", "transposed", "empty", "scalar", "requires_grad")
         if layout != "requires_grad" or DTYPES[name].is_floating_point]  # only floating tensors take gradients


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_tensor_round_trips_bit_exact(name, layout):
    t = _sample(DTYPES[name])
    if layout == "transposed":
        t = t.transpose(0, 2)
    elif layout == "empty":
        t = t[:0]
    elif layout == "scalar":
        t = t[1, 2, 3]
    elif layout == "requires_grad":
        t = t.clone().requires_grad_(True)
    msg = to_wire(t)
    assert msg.dtype == name and list(msg.shape) == list(t.shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = from_wire(msg)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), t.detach().reshape(-1).view(torch.uint8))


def test_decoded_tensor_is_writable_and_owns_its_bytes():
    msg = to_wire(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    t = from_wire(msg)
    t += 1  # a read-only frombuffer view would refuse this
    assert torch.equal(from_wire(msg), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_unsupported_dtype_cannot_travel():
    with pytest.raises(DTypeMismatch):
        to_wire(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(DTypeMismatch):
        from_wire(pb.Tensor(dtype="float64", shape=[1], data=bytes(8)))


@pytest.mark.parametrize("shape,size", [([2, 3], 20), ([2, 3], 28), ([-1, 3], 0), ([2**40, 2**40], 0)])
def test_byte_length_must_match_the_shape(shape, size):
    with pytest.raises(ShapeMismatch):
        from_wire(pb.Tensor(dtype="float32", shape=shape, data=bytes(size)), "k")


def _experiments_after(code: str, env: dict[str, str]) -> str:
    full = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"} | env
    out = subprocess.run([sys.executable, "-c", code + "\nimport os; print(repr(os.environ.get('GRPC_EXPERIMENTS')))"],
                         env=full, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_importing_the_client_turns_the_event_engine_tcp_paths_off():
    assert _experiments_after("import kvcache.clients.remote", {}) == repr(LOW_LATENCY_EXPERIMENTS)


def test_an_explicit_grpc_experiments_setting_wins():
    assert _experiments_after("import kvcache.service.server", {"GRPC_EXPERIMENTS": ""}) == repr("")


def test_nothing_is_set_once_grpc_is_loaded():
    # grpc read its settings at import: setting them later would only mislead child processes.
    assert _experiments_after("import grpc, kvcache.clients.remote", {}) == repr(None)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_a_tensor_filled_in_place_is_the_message_to_wire_builds(name):
    t = _sample(DTYPES[name])
    request = pb.AttendRequest()
    data = fill_wire(request.q, t)
    assert request.HasField("q") and request.q == to_wire(t) and data == request.q.data
    empty = pb.AttendRequest()
    assert fill_wire(empty.q, t[:0]) == b"" and empty.HasField("q") and empty.q == to_wire(t[:0])
