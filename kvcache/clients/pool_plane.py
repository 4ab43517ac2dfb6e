"""PoolPlane: an engine's connection to a server's shared page pool (docs/wire-protocol.md, "Shared pool").

An eager decode step costs two round trips on the local data plane's socket, none per layer: the lease when it begins,
and the commit once its last layer's rows are written (so its sequences are free for any other call as soon as the
step returns). Captured steps lease several steps at once and commit them with the next lease (engine/graph_decode.py):
one round trip per lease. The steps' appends and attention run in this process on the mapped pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch

from kvcache import errors
from kvcache.clients.inprocess import InProcessClient, StepCalls
from kvcache.clients.mapped_store import MappedStore
from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.errors import PlanStale
from kvcache.methods.byte_budget import budget_of
from kvcache.methods.registry import lookup
from kvcache.methods.result import AttentionResult
from kvcache.store.page_pool import PagePool
from kvcache.store.shared_segment import CudaSegment, Region, SharedEvent, SharedSegment
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.frames import read_frame, read_frame_with_fds, write_frame
from kvcache.wire.messages import cuda_handle_from_wire

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def pool_runs(method: str, params: Mapping[str, Any] | None,
              layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None) -> bool:
    """Whether a step of these methods can run on the mapped pool: not the gate (its keys are the server's) nor a
    byte budget (its allocation is the server's); those steps send their layer calls instead."""
    choices = [(method, params), *(layer_methods or {}).values()]
    try:
        return not any(lookup(m).needs_gate or budget_of(p)[0] is not None for m, p in choices)
    except errors.KVCacheError:
        return False  # an unknown method or bad parameters: the server's answer says why


class PoolPlane:
    """One connection (one engine thread) to a server's shared pool, bound by `ticket` to a gRPC connection."""

    def __init__(self, path: str, ticket: str, timeout: float | None, max_message_bytes: int,
                 config: KVCacheConfig) -> None:
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.closed = True
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)  # FileNotFoundError on another host
            write_frame(self._sock, pb.LocalHello(ticket=ticket, pool=True).SerializeToString())
            frame, fds = read_frame_with_fds(self._sock, 4096, 2)
            offer = pb.PoolOffer.FromString(frame)
            if offer.error_class == "NotSupported":
                raise _error(offer.error_code, offer.error_message, offer.error_class)
            if offer.error_code:
                raise ConnectionRefusedError(f"the data plane refused the connection: {offer.error_message}")
            self._map(offer, config, fds)  # takes the descriptors, used or not
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._sock.close()
            raise
        self.slots = offer.workspace_slots
        self.lease_seconds = offer.lease_seconds
        self.client = InProcessClient(self.store)
        self.closed = False
        self._step: Any = None  # the eager step begun last: ended (committed or aborted) by the next call
        self.deadline = 0.0  # time.monotonic() by which the lease taken last must be committed
        self._reported: dict[str, dict[str, float]] = {}

    def _map(self, offer: pb.PoolOffer, config: KVCacheConfig, fds: list[int]) -> None:
        """Map the offer's segments: memfds on the CPU, CUDA IPC handles (and the two IPC events) on a GPU."""
        if offer.cuda:
            config = dataclasses.replace(config, device=torch.device("cuda", offer.cuda[0].device))
        if offer.pool_bytes != PagePool.regions(config)[1] or len(fds) + len(offer.cuda) != 2:
            raise errors.RemoteError("the server's pool offer does not match its config [INTERNAL]")
        if offer.cuda:
            dev = config.device
            pool, sums = (CudaSegment(n, dev, cuda_handle_from_wire(h))
                          for n, h in zip((offer.pool_bytes, offer.workspace_bytes), offer.cuda))
            self.server_event: SharedEvent | None = SharedEvent(dev, offer.server_event)
            self.engine_event: SharedEvent | None = SharedEvent(dev, offer.engine_event)
        else:
            # Each SharedSegment takes its descriptor (closing it once mapped, or on failure): none is left here.
            pool_fd, sums_fd = fds
            fds.clear()
            try:
                pool = SharedSegment(offer.pool_bytes, pool_fd)
            except BaseException:
                os.close(sums_fd)
                raise
            sums = SharedSegment(offer.workspace_bytes, sums_fd)
            self.server_event = self.engine_event = None
        self.store = MappedStore(config, pool, offer.scratch_page)
        shape = (offer.workspace_slots, config.num_layers, config.num_kv_heads, config.head_dim)
        self._sums = sums.tensor(Region(0, shape, SUMMARY_DTYPE))

    def lease(self, seq_ids: Sequence[str], steps: int = 1) -> float:
        """End the previous lease and lease up to `steps` steps of `seq_ids` (several only for steps written whole, as
        a replayed graph writes them), installed in `store` for a DecodeStep or a graph; returns the time.monotonic()
        by which they must be committed. `store.steps_left` says how many steps were granted."""
        asked = time.monotonic()  # the server's lease runs from later: a deadline from here is never past its own
        reply = self._call(list(seq_ids), steps)
        pages, at = [], 0
        for n in reply.page_counts:
            pages.append(reply.pages[at : at + n])
            at += n
        if self.server_event is not None:
            self.server_event.wait()  # the lease's page copies and value sums come first
        self.store.install(reply.step_id, seq_ids, list(reply.start_lengths), pages, self._sums, max(1, reply.steps))
        self.deadline = asked + self.lease_seconds
        return self.deadline

    def begin_step(self, seq_ids: Sequence[str], q_heads: int, method: str = "dense",
                   params: Mapping[str, Any] | None = None, backend: str = "auto",
                   layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None = None) -> StepCalls:
        """End the previous step, lease this one, and begin it on the mapped pool: each layer's attend appends and
        attends here."""
        deadline = self.lease(seq_ids)
        try:
            self._step = self.client.begin_step(seq_ids, q_heads, method, params, backend, layer_methods)
        except BaseException:
            self.flush()  # the step's checks failed here: the lease is aborted, the sequences free at once
            raise
        return _LeasedStep(self._step, self, deadline)

    def holds(self, seq_ids: Sequence[str]) -> bool:
        """Whether the lease taken last is still open and names any of `seq_ids`."""
        return bool(self.store.lease_id) and not set(seq_ids).isdisjoint(self.store.sequence_ids())

    def flush(self) -> None:
        """End the lease taken last if it is still open: its steps written whole committed, a lease with none aborted
        (before a control call on its sequences, which the lease would refuse)."""
        if self.store.lease_id:
            self._call([])

    def close(self) -> None:
        """Hang up: the server aborts a step not yet ended."""
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _call(self, seq_ids: list[str], steps: int = 1) -> pb.LeaseReply:
        request = pb.LeaseRequest(seq_ids=seq_ids, steps=steps)
        done_id, done_steps = self.store.end_lease()
        if done_id:
            request.done_step_id, request.done_steps = done_id, done_steps
            if self.engine_event is not None:
                self.engine_event.record()  # the server's stream waits for the steps' writes
        counted = self.client.counters.snapshot()
        for method, totals in counted.items():
            seen = self._reported.get(method, {})
            request.methods[method].CopyFrom(pb.MethodStats(
                calls=int(totals["calls"] - seen.get("calls", 0)),
                bytes_read=int(totals["bytes_read"] - seen.get("bytes_read", 0)),
                seconds=totals["seconds"] - seen.get("seconds", 0.0)))
        self._step = None
        try:
            self._sock.settimeout(self.timeout)
            write_frame(self._sock, request.SerializeToString())
            frame = read_frame(self._sock, self.max_message_bytes)
            if frame is None:
                raise ConnectionError("the server closed the connection")
            reply = pb.LeaseReply.FromString(frame)
        except TimeoutError:
            self.close()
            raise errors.Unavailable(f"no lease reply within {self.timeout} s [DEADLINE_EXCEEDED]") from None
        except (OSError, ValueError) as exc:
            self.close()
            raise errors.Unavailable(f"the server's data plane closed ({exc}) [UNAVAILABLE]") from None
        self._reported = counted  # booked at the server with this frame
        if reply.error_code:
            raise _error(reply.error_code, reply.error_message, reply.error_class)
        return reply


class _LeasedStep:
    """A step on the mapped pool whose lease is committed as soon as its last layer's rows are written."""

    def __init__(self, step: Any, plane: PoolPlane, deadline: float) -> None:
        self.step = step  # the in-process client's counting step, over a DecodeStep
        self.plane = plane
        self.deadline = deadline  # time.monotonic() past which the server may have ended the lease

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor) -> AttentionResult:
        """Append new_k, new_v [B, Hkv, d] at `layer` and attend q [B, Hq, d]; commits the step after its last layer.
        PlanStale once the lease has ended: its pages may belong to another sequence by then, so nothing is written."""
        if self.plane._step is not self.step:
            raise PlanStale("this step's lease was ended (a call on its sequences, or the next step, ended it): "
                            "begin the step again")
        if time.monotonic() > self.deadline:
            self.plane.flush()  # aborted: the server may have ended it already
            raise PlanStale(f"this step's lease of {self.plane.lease_seconds} s ran out before its layer {layer}: "
                            f"begin the step again")
        result = self.step.attend(layer, q, new_k, new_v)
        if self.plane.store.steps_done:
            self.plane.flush()
        return result


def _error(code: int, message: str, class_name: str) -> errors.KVCacheError:
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    cls = getattr(errors, class_name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KVCacheError)):
        cls = errors.RemoteError
    return cls(f"{message} [{status.name}]")
