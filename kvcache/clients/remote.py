"""RemoteClient: the KVCacheClient protocol over gRPC, raising the same exceptions as InProcessClient.

Deadlines on every call; retries (with backoff) only for idempotent calls and only on UNAVAILABLE;
attend goes over one bidirectional stream per thread, so a decode step's layer calls pay no
per-call setup.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kvcache.wire.transport import prefer_low_latency_core

prefer_low_latency_core()  # grpc core reads its settings once, at its import just below

import grpc
import torch

from kvcache import errors
from kvcache.clients.inprocess import FetchKind, FetchResult, PlannedCalls
from kvcache.clients.local_plane import LocalConnection
from kvcache.clients.pool_plane import PoolPlane, pool_runs
from kvcache.config import KVCacheConfig
from kvcache.methods import AttentionResult
from kvcache.prefill.minference_index import BLOCK_SIZE, SparseIndex
from kvcache.prefill.serving import HeadPattern, SparsePrefillResult
from kvcache.store import SequenceInfo
from kvcache.store.step_plan import StepPlan
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire import kvcache_pb2_grpc as pb_grpc
from kvcache.wire.codec import ERROR_CLASS_KEY, fill_wire, from_wire
from kvcache.wire.messages import config_from_wire, coverage_from_wire, info_from_wire, params_to_wire

_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidParameter,
    grpc.StatusCode.NOT_FOUND: errors.SequenceNotFound,
    grpc.StatusCode.OUT_OF_RANGE: errors.PositionOutOfRange,
    # A full store says StoreFull in its trailing metadata; without a class it was the message size.
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.MessageTooLarge,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    # This client never cancels a call itself: a cancellation is the server going away.
    grpc.StatusCode.CANCELLED: errors.Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNIMPLEMENTED: errors.NotSupported,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def _error(code: grpc.StatusCode, message: str, class_name: str | None) -> errors.KVCacheError:
    cls = getattr(errors, class_name or "", None)
    if not (isinstance(cls, type) and issubclass(cls, errors.KVCacheError)):
        cls = _BY_CODE.get(code, errors.RemoteError)
    return cls(f"{message} [{code.name}]")


def _from_rpc_error(exc: grpc.RpcError) -> errors.KVCacheError:
    class_name = dict(exc.trailing_metadata() or ()).get(ERROR_CLASS_KEY)
    return _error(exc.code(), exc.details() or "", class_name)


class _AttendStream:
    """One AttendStream call. The caller hands its request to grpc's sending thread and reads the
    reply itself: a reader thread of our own would add a thread wake-up to every round trip, which
    on a loaded machine costs more than the wire. A _Watchdog enforces the deadline instead."""

    def __init__(self, stub: pb_grpc.KVCacheStub, metadata) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.AttendStream(self._iterate(), metadata=metadata)
        self.due: float | None = None  # time.monotonic() by which the awaited reply must come
        self.expired = False  # the watchdog cancelled the call: it is dead even if a reply slipped in
        self._due_lock = threading.Lock()  # so a late check of one call's deadline cannot cancel the next call

    def _iterate(self) -> Iterator[pb.AttendRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def call(self, request: pb.AttendRequest, timeout: float | None) -> pb.AttendResponse:
        """Send one request and wait for its response; raises grpc.RpcError, Unavailable on a deadline."""
        self.due = None if timeout is None else time.monotonic() + timeout
        self._requests.put(request)
        try:
            return next(self._call)
        except StopIteration:
            raise errors.Unavailable("attend stream closed by the server [UNAVAILABLE]") from None
        except grpc.RpcError:
            if self.expired:
                raise errors.Unavailable(f"no attend reply within {timeout} s [DEADLINE_EXCEEDED]") from None
            raise
        finally:
            with self._due_lock:
                self.due = None

    def expire_if_overdue(self, now: float) -> None:
        """Cancel the call if the reply being waited for is past its deadline."""
        due = self.due
        if due is None or now <= due:
            return
        with self._due_lock:
            if self.due is not due:  # that reply came in the meantime
                return
            self.expired = True
        self.close()

    def close(self) -> None:
        """End the stream (and grpc's thread that sends its requests)."""
        self._requests.put(None)
        self._call.cancel()


class _Watchdog:
    """A daemon thread that cancels streams whose awaited reply is overdue, checked every `period` s."""

    def __init__(self, streams: list[_AttendStream], period: float) -> None:
        self._streams = streams
        self._period = period
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="kvcache-attend-deadlines").start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            now = time.monotonic()
            for stream in list(self._streams):
                stream.expire_if_overdue(now)

    def stop(self) -> None:
        """End the thread."""
        self._stop.set()


DATA_PLANES = ("grpc", "auto", "shared")


class RemoteClient:
    """KVCacheClient over a `kvcache serve` at `target` ("host:port")."""

    IDEMPOTENT = {"Describe", "Fetch", "Stats", "Health", "Config"}
    CHANGING = {"Fork", "Free", "Append", "Plan"}  # calls that a step's lease on their sequences would refuse

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        max_message_mb: int = 64,
        use_stream: bool = True,
        data_plane: str = "auto",
        share_pool: bool = True,
    ) -> None:
        limit = max_message_mb * 2**20
        # A connection of its own: the server counts sequences and pages per connection (per-client caps), and
        # channels to one target would otherwise share grpc's global subchannel, hence one peer address.
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.use_local_subchannel_pool", 1)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.KVCacheStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = retries
        self.use_stream = use_stream
        if data_plane not in DATA_PLANES:
            raise errors.InvalidParameter(f"data_plane={data_plane!r}: expected one of {DATA_PLANES}")
        # "shared": layer calls over the server's local data plane (a Unix socket, same host only), or an error;
        # "auto": that where the server offers it and this host can reach it, else gRPC; "grpc": always gRPC.
        self.data_plane = data_plane
        # Where the data plane is local and the server shares its page pool: decode steps run here on the mapped pool.
        self.share_pool = share_pool
        self._max_message_bytes = limit
        self._planes: list[LocalConnection | PoolPlane] = []  # every thread's connections, for close()
        self._local = threading.local()
        self._streams: list[_AttendStream] = []  # every open stream, for the watchdog and close()
        self._streams_lock = threading.Lock()
        self._watchdog: _Watchdog | None = None
        self._config: KVCacheConfig | None = None

    # ---- protocol --------------------------------------------------------------------------

    @property
    def config(self) -> KVCacheConfig:
        """The server store's config (fetched once; device as seen by this client: cpu)."""
        if self._config is None:
            self._config = config_from_wire(self._call("Config", pb.ConfigRequest()))
        return self._config

    def create(self, token_ids: Sequence[int] | None = None, lease_seconds: float | None = None) -> SequenceInfo:
        """New sequence; full pages of `token_ids` found in the prefix cache are reused; with a lease, the server
        frees it once no call has named it for `lease_seconds` (a client that died leaves nothing behind)."""
        request = pb.CreateRequest(token_ids=_ids(token_ids), lease_seconds=lease_seconds or 0.0)
        return info_from_wire(self._call("Create", request))

    def fork(self, seq_id: str) -> SequenceInfo:
        """New sequence sharing `seq_id`'s pages (copy-on-write)."""
        return info_from_wire(self._call("Fork", pb.SequenceRef(seq_id=seq_id)))

    def free(self, seq_id: str) -> None:
        """Release a sequence."""
        self._call("Free", pb.SequenceRef(seq_id=seq_id))

    def describe(self, seq_id: str) -> SequenceInfo:
        """Lengths and pages of a sequence."""
        return info_from_wire(self._call("Describe", pb.SequenceRef(seq_id=seq_id)))

    def append(
        self,
        seq_id: str,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int | None = None,
        start: int | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> SequenceInfo:
        """Write K/V for new positions: [L, T, Hkv, d] for all layers or [T, Hkv, d] for one."""
        return info_from_wire(self._call("Append", _append_request(seq_id, k, v, layer, start, token_ids)))

    def append_chunks(
        self, seq_id: str, chunks: Sequence[tuple[torch.Tensor, torch.Tensor]], layer: int | None = None
    ) -> SequenceInfo:
        """A long prefill as one client stream of (k, v) chunks, appended in order (chunk by chunk with unary calls
        when the server has no stream to spare: it refused the stream before reading any chunk)."""
        self._end_pool_step(pb.SequenceRef(seq_id=seq_id))
        requests = (_append_request(seq_id, k, v, layer, None, None) for k, v in chunks)
        try:
            reply = self._stub.AppendStream(requests, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if dict(exc.trailing_metadata() or ()).get(ERROR_CLASS_KEY) != "TooManyStreams":
                raise _from_rpc_error(exc) from None
            info = None
            for k, v in chunks:
                info = self.append(seq_id, k, v, layer=layer)
            return info if info is not None else self.describe(seq_id)
        return info_from_wire(reply)

    def attend(
        self,
        seq_ids: Sequence[str],
        layer: int,
        q: torch.Tensor,
        method: str = "dense",
        params: Mapping[str, Any] | None = None,
        new_k: torch.Tensor | None = None,
        new_v: torch.Tensor | None = None,
        backend: str = "auto",
        plan: StepPlan | None = None,
    ) -> AttentionResult:
        """Attention of q [B, Hq, d] at `layer`; new_k/new_v [B, Hkv, d], if given, are appended first; with a
        step's plan (plan_step), the server reuses that step's page table."""
        request = _attend_request(seq_ids, layer, q, method, params, new_k, new_v, backend, plan)
        if new_k is not None:
            self._end_pool_step(request)
        plane = self._plane() if self.data_plane != "grpc" else None
        if plane is not None:
            reply = _raise_if_error(plane.call(request, self.timeout))
        elif self.use_stream:
            reply = self._attend_on_stream(request)
        else:
            reply = self._call("Attend", request, idempotent=new_k is None and new_v is None)
        return _attention_result(reply)

    def begin_step(self, seq_ids: Sequence[str], q_heads: int, method: str = "dense",
                   params: Mapping[str, Any] | None = None, backend: str = "auto",
                   layer_methods: Mapping[int, tuple[str, Mapping[str, Any] | None]] | None = None) -> PlannedCalls:
        """A decode step planned once: each layer's attend(layer, q, new_k, new_v) is an attend with its plan. Over a
        server's shared pool (data_plane "auto" or "shared" where it shares one) the step is leased instead, and its
        layers append and attend in this process on the mapped pool."""
        pool = self.pool_plane() if pool_runs(method, params, layer_methods) else None
        if pool is not None:
            return pool.begin_step(seq_ids, q_heads, method, params, backend, layer_methods)
        return PlannedCalls(self, seq_ids, method, params, backend, layer_methods)

    def end_step(self) -> None:
        """End this thread's step on the shared pool if it is still open: committed if every layer ran, else aborted
        (its sequences keep their lengths). A change to its sequences does it first; a step whose last layer ran is
        committed already."""
        self._end_pool_step()

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1) -> StepPlan:
        """Plan a decode step on the server: a handle whose step_id every layer's attend(..., plan=) sends."""
        reply = self._call("Plan", pb.PlanRequest(seq_ids=list(seq_ids), new_tokens=new_tokens))
        return StepPlan(tuple(seq_ids), new_tokens, (), (), None, reply.step_id)

    def fetch(self, seq_id: str, layer: int, what: FetchKind, index: torch.Tensor | None = None) -> FetchResult:
        """Raw reads for engines that attend themselves (columns, rows, value_mean, summaries)."""
        request = pb.FetchRequest(seq_id=seq_id, layer=layer, what=what)
        if index is not None:
            _fill(request.index, index, "index")
        reply = self._call("Fetch", request)
        return FetchResult(tuple(from_wire(t) for t in reply.tensors), reply.bytes_read)

    def stats(self) -> dict[str, Any]:
        """Pool usage, per-method and per-RPC calls, bytes read and seconds, attend-stream batching, and per method
        and layer the coverage estimates and dense fallbacks the server counted."""
        s = self._call("Stats", pb.StatsRequest())
        return {
            "pool": dict(s.pool),
            "methods": {m: {"calls": t.calls, "bytes_read": t.bytes_read, "seconds": t.seconds}
                        for m, t in s.methods.items()},
            "rpcs": {r: {"calls": t.calls, "errors": t.errors, "seconds": t.seconds} for r, t in s.rpcs.items()},
            "bytes_moved": dict(s.bytes_moved),
            "batching": dict(s.batching),  # the server's attend streams (AttendBatcher)
            "coverage": coverage_from_wire(s.coverage),
        }

    def verify(self) -> dict[str, Any]:
        """The server's scrub of its lower tiers: pages_checked, corrupted_pages (quarantined), sequences."""
        r = self._call("Verify", pb.VerifyRequest())
        return {"pages_checked": r.pages_checked, "corrupted_pages": list(r.corrupted_pages),
                "sequences": list(r.sequences)}

    def prefetch(self, seq_id: str, pages: Sequence[int] | None = None) -> SequenceInfo:
        """Bring pages (indexes into the sequence's page table; all if None) to the device ahead of use."""
        request = pb.PrefetchRequest(seq_id=seq_id, pages=list(pages or []))
        return info_from_wire(self._call("Prefetch", request, idempotent=True))

    def health(self) -> str:
        """"SERVING" or "DRAINING"."""
        return self._call("Health", pb.HealthRequest()).status

    def sparse_index(
        self,
        seq_id: str,
        layer: int,
        q: torch.Tensor,
        start: int,
        patterns: HeadPattern | Sequence[HeadPattern],
        block_size: int = BLOCK_SIZE,
    ) -> SparseIndex:
        """MInference index of the prefill chunk q [T, Hq, d] at positions [start, start + T), from the keys held."""
        reply = self._call("SparseIndex", _sparse_request(seq_id, layer, q, start, patterns, block_size),
                           idempotent=True)
        if len(reply.tensors) != 4:
            raise errors.RemoteError(f"SparseIndex answered {len(reply.tensors)} tensors; expected 4")
        block_index, block_count, column_index, column_count = (from_wire(t) for t in reply.tensors)
        return SparseIndex(reply.block_size, reply.start, reply.num_queries, block_index, block_count, column_index,
                           column_count)

    def sparse_prefill(
        self,
        seq_id: str,
        layer: int,
        q: torch.Tensor,
        start: int,
        patterns: HeadPattern | Sequence[HeadPattern],
        block_size: int = BLOCK_SIZE,
        backend: str = "auto",
    ) -> SparsePrefillResult:
        """Sparse prefill attention of the chunk q [T, Hq, d] at `start` (its K/V appended first): out, lse."""
        request = _sparse_request(seq_id, layer, q, start, patterns, block_size)
        request.backend = backend
        reply = self._call("SparsePrefill", request, idempotent=True)
        return SparsePrefillResult(from_wire(reply.out, "out"), from_wire(reply.lse, "lse"), reply.bytes_read,
                                   reply.pairs, reply.causal_pairs)

    def close(self) -> None:
        """Close the streams, the data plane connections and the channel."""
        for plane in list(self._planes):
            plane.close()
        if self._watchdog is not None:
            self._watchdog.stop()
        with self._streams_lock:
            streams, self._streams[:] = list(self._streams), []
        for stream in streams:
            stream.close()
        self._channel.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------

    def _call(self, rpc: str, request, idempotent: bool | None = None):
        if rpc in self.CHANGING or rpc == "Attend" and request.HasField("new_k"):
            self._end_pool_step(request)
        idempotent = rpc in self.IDEMPOTENT if idempotent is None else idempotent
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return getattr(self._stub, rpc)(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() in _RETRYABLE and attempt + 1 < attempts:
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise _from_rpc_error(exc) from None
        raise AssertionError("unreachable")

    def _end_pool_step(self, request=None) -> None:
        """End this thread's open step on the shared pool if the change about to be made names any of its sequences
        (any change, without `request`): its lease would refuse the call. Reads go on beside a step."""
        pool = getattr(self._local, "pool", None)
        if pool is None or pool.closed:
            return
        if request is None or pool.holds([*getattr(request, "seq_ids", ()), getattr(request, "seq_id", "")]):
            pool.flush()

    def pool_plane(self) -> PoolPlane | None:
        """This thread's connection to the server's shared pool, opened at its first step; None where the server
        shares none or data_plane is "grpc" (then layer calls are messages). An engine that replays captured steps
        leases them through it (engine/graph_decode.py, LeasedGraphDecoder)."""
        pool = getattr(self._local, "pool", None)
        if pool is not None and not pool.closed:
            return pool
        if self.data_plane == "grpc" or not self.share_pool or getattr(self._local, "no_pool", False):
            return None
        config = self.config
        try:
            offer = self._call("OpenDataPlane", pb.DataPlaneRequest())
        except errors.NotSupported:
            self._local.no_pool = True
            return None
        try:
            if not offer.socket_path:
                raise ConnectionRefusedError("the server offers no local data plane")
            pool = PoolPlane(offer.socket_path, offer.ticket, self.timeout, self._max_message_bytes, config)
        except (OSError, errors.NotSupported):  # another host, another user, or a pool that is not shared
            self._local.no_pool = True
            return None
        self._local.pool = pool
        self._planes[:] = [p for p in self._planes if not p.closed] + [pool]
        return pool

    def _plane(self) -> LocalConnection | None:
        """This thread's connection to the server's local data plane, opened at its first call; None where "auto"
        found none (then gRPC serves this thread's calls). Each thread holds its own, as it holds its own stream."""
        plane = getattr(self._local, "plane", None)
        if plane is not None and not plane.closed:
            return plane
        if getattr(self._local, "no_plane", False):
            return None
        try:
            offer = self._call("OpenDataPlane", pb.DataPlaneRequest())
        except errors.KVCacheError as exc:
            if self.data_plane == "shared" or isinstance(exc, errors.Unavailable):
                raise  # a server away now may offer the plane when it is back: ask again at the next call
            self._local.no_plane = True  # a server without the RPC (UNIMPLEMENTED): gRPC answers, or says why not
            return None
        try:
            if not offer.socket_path:
                raise ConnectionRefusedError("the server offers no local data plane (kvcache serve --no-local-plane)")
            plane = LocalConnection(offer.socket_path, offer.ticket, self.timeout, self._max_message_bytes)
        except (OSError, ValueError) as exc:  # another host (no such socket here), another user, a refusal
            if self.data_plane == "shared":
                raise errors.Unavailable(f"data_plane='shared': the server's local data plane cannot be reached "
                                         f"from here ({exc}) [UNAVAILABLE]") from None
            self._local.no_plane = True
            return None
        self._local.plane = plane
        self._planes[:] = [p for p in self._planes if not p.closed] + [plane]
        return plane

    def _attend_on_stream(self, request: pb.AttendRequest) -> pb.AttendResponse:
        if getattr(self._local, "unary", False):
            return self._call("Attend", request, idempotent=not request.HasField("new_k"))
        stream = getattr(self._local, "stream", None)
        if stream is None or stream.expired:
            stream = self._open_stream()
        try:
            reply = stream.call(request, self.timeout)
        except grpc.RpcError as exc:
            self._drop_stream(stream)  # the stream is dead; the next call opens a new one
            class_name = dict(exc.trailing_metadata() or ()).get(ERROR_CLASS_KEY)
            if class_name == "TooManyStreams":  # the server has no thread to spare for another stream
                self._local.unary = True
                return self._call("Attend", request, idempotent=not request.HasField("new_k"))
            raise _from_rpc_error(exc) from None
        except errors.Unavailable:
            self._drop_stream(stream)
            raise
        return _raise_if_error(reply)

    def _open_stream(self) -> _AttendStream:
        old = getattr(self._local, "stream", None)
        if old is not None:
            self._drop_stream(old)
        stream = self._local.stream = _AttendStream(self._stub, self._metadata)
        with self._streams_lock:
            self._streams.append(stream)
            if self._watchdog is None and self.timeout is not None:
                # Deadlines are checked this often: late by at most a twentieth of the timeout.
                self._watchdog = _Watchdog(self._streams, min(0.1, max(0.005, self.timeout / 20)))
        return stream

    def _drop_stream(self, stream: _AttendStream) -> None:
        stream.close()
        with self._streams_lock:
            if stream in self._streams:
                self._streams.remove(stream)
        if getattr(self._local, "stream", None) is stream:
            self._local.stream = None


def _raise_if_error(reply: pb.AttendResponse) -> pb.AttendResponse:
    """`reply`, or the error it carries instead of a result (a streamed or local-plane attend) raised."""
    if reply.error_code:
        raise _error(_CODE_BY_VALUE.get(reply.error_code, grpc.StatusCode.UNKNOWN), reply.error_message,
                     reply.error_class)
    return reply


def _attend_request(seq_ids: Sequence[str], layer: int, q: Any, method: str, params: Mapping[str, Any] | None,
                    new_k: Any, new_v: Any, backend: str, plan: StepPlan | None) -> pb.AttendRequest:
    """An attend's request; its tensors are written into it in place (codec.fill_wire), not built and copied in."""
    request = pb.AttendRequest(seq_ids=seq_ids, layer=layer, method=method, backend=backend)
    _fill(request.q, q, "q")
    for name, value in (params_to_wire(params) if params else {}).items():
        request.params[name].CopyFrom(value)
    if new_k is not None:
        _fill(request.new_k, new_k, "new_k")
    if new_v is not None:
        _fill(request.new_v, new_v, "new_v")
    if plan is not None:
        request.step_id = plan.step_id
    return request


def _attention_result(reply: pb.AttendResponse) -> AttentionResult:
    """The AttentionResult an attend reply carries."""
    return AttentionResult(from_wire(reply.out, "out"), from_wire(reply.lse, "lse"), reply.bytes_read,
                           dict(reply.bytes_moved) if reply.bytes_moved else {},
                           coverage=from_wire(reply.coverage, "coverage") if reply.HasField("coverage") else None,
                           fallback=torch.tensor(list(reply.fallback), dtype=torch.bool) if reply.fallback else None)


def _ids(token_ids: Sequence[int] | torch.Tensor | None) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return token_ids.flatten().tolist()
    return list(token_ids)


def _wire(t: Any, name: str) -> pb.Tensor:
    msg = pb.Tensor()
    _fill(msg, t, name)
    return msg


def _fill(msg: pb.Tensor, t: Any, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise errors.ShapeMismatch(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    fill_wire(msg, t)


def _sparse_request(seq_id, layer, q, start, patterns, block_size) -> pb.SparseIndexRequest:
    request = pb.SparseIndexRequest(seq_id=seq_id, layer=layer, q=_wire(q, "q"), start=start, block_size=block_size)
    if isinstance(patterns, HeadPattern):
        request.pattern = patterns.pattern
        request.sizes.update(patterns.params)
    else:
        for p in patterns:
            if not isinstance(p, HeadPattern):
                raise errors.InvalidParameter(f"head patterns must be HeadPattern, got {type(p).__name__}")
            request.heads.append(pb.HeadPattern(pattern=p.pattern, sizes=p.params))
    return request


def _append_request(seq_id, k, v, layer, start, token_ids) -> pb.AppendRequest:
    request = pb.AppendRequest(seq_id=seq_id, k=_wire(k, "k"), v=_wire(v, "v"), token_ids=_ids(token_ids))
    if layer is not None:
        request.layer = layer
    if start is not None:
        request.start = start
    return request
