"""`kvcache serve`: the gRPC service over an in-process store (docs/wire-protocol.md).

Every call: bearer token checked (if configured), refused with UNAVAILABLE while draining, the
sequences it names locked (sorted, so calls on one sequence are ordered and calls on different
ones run in parallel), kvcache errors mapped to their status codes, anything else logged and
answered INTERNAL. One JSON log line per call.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

from kvcache.wire.transport import prefer_low_latency_core

prefer_low_latency_core()  # grpc core reads its settings once, at its import just below

import grpc
import torch

from kvcache.clients.inprocess import AttendCall, InProcessClient
from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter, KVCacheError, MessageTooLarge, PlanStale, ShapeMismatch, Unavailable
from kvcache.methods.attend import check_work
from kvcache.methods.byte_allocation import attach_allocation
from kvcache.methods.byte_budget import resolved_params
from kvcache.methods.gate_store import attach_gate
from kvcache.methods.registry import lookup
from kvcache.methods.result import AttentionResult
from kvcache.prefill.minference_index import BLOCK_SIZE
from kvcache.prefill.serving import HeadPattern
from kvcache.service.batcher import AttendBatcher
from kvcache.service.client_quotas import ClientQuotas
from kvcache.service.heap_trim import HeapTrimmer
from kvcache.service.input_limits import InputLimits
from kvcache.service.local_plane import LocalPlane, error_reply
from kvcache.service.locks import SequenceLocks
from kvcache.service.log_fields import LogFields
from kvcache.service.metrics import CallMetrics, serve_metrics
from kvcache.service.pool_sessions import PoolSession
from kvcache.stats import Totals
from kvcache.store import KVStore
from kvcache.store.page_pool import PagePool
from kvcache.store.shared_segment import CudaSegment, SharedSegment
from kvcache.store.step_plan import StepPlan
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire import kvcache_pb2_grpc as pb_grpc
from kvcache.wire.codec import ERROR_CLASS_KEY, fill_wire, from_wire, to_wire
from kvcache.wire.messages import config_to_wire, coverage_to_wire, info_to_wire, params_from_wire

log = logging.getLogger("kvcache.service.server")


@dataclass
class ServerOptions:
    """Network and safety settings of `kvcache serve`."""

    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 16
    max_message_mb: int = 64
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # the metrics endpoint's address, loopback unless asked otherwise
    grace_seconds: float = 30.0
    torch_threads: int | None = None  # intra-op threads of each RPC thread's torch ops
    cpus: list[int] | None = None  # CPU ids the process runs on (serve_cli.pin_process); None: all
    gate: str | None = None  # page-gate weights (a path or a name under kvcache/methods/gates/) for method "gate"
    allocation: str | None = None  # byte allocation (a path or a name under kvcache/methods/allocations/)
    reject_nonfinite: bool = True  # NaN or Inf in q, k or v is INVALID_ARGUMENT (service/input_limits.py)
    max_query_heads: int | None = None  # query heads one attend may bring (None: 16 per kv head)
    max_call_memory: int | None = None  # bytes of working memory one attend may need (None: default_call_memory)
    max_sequences_per_client: int = 4096  # live sequences one connection may hold (0: no cap)
    max_pages_per_client: int = 0  # pages one connection's sequences may hold (0: no cap, the pool is the cap)
    local_plane: bool = True  # offer same-host clients a Unix socket for their layer calls (service/local_plane.py)
    share_pool: bool = False  # the page pool in shared memory: local-plane engines lease steps and attend themselves
    step_lease_seconds: float = 10.0  # a step leased on the shared pool and not ended within this is aborted


@dataclass
class _Chunks:
    """The first chunk of an AppendStream (it names the sequence) and the rest of the stream."""

    first: object
    rest: Iterator


class _InFlight:
    """Counts unary calls being served (a context manager around each)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.count = 0

    def __enter__(self) -> None:
        with self._lock:
            self.count += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.count -= 1
            self._lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight (True) or `timeout` seconds pass (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.count == 0, timeout)


def _handler(rpc: str, seq_ids_of: Callable[[object], list[str]] | None = None, while_draining: bool = False):
    """Decorator for a unary servicer method: locking, error mapping, metrics, one log line. While the server
    drains every call is refused (UNAVAILABLE) but those marked `while_draining` (Health answers DRAINING)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(self: KVCacheServicer, request, context: grpc.ServicerContext):
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if self.draining.is_set() and not while_draining:
                    code = grpc.StatusCode.UNAVAILABLE
                    context.abort(code, "server is shutting down")
                seq_ids = seq_ids_of(request) if seq_ids_of else []
                with self.in_flight, self.locks.hold(seq_ids):
                    remaining = context.time_remaining()  # None without a deadline
                    if not context.is_active() or (remaining is not None and remaining <= 0):
                        # The client gave up (or its deadline passed) while the call waited: do no work for it.
                        code = grpc.StatusCode.CANCELLED
                        context.abort(code, "the client gave up before the call ran")
                    return fn(self, request, context)
            except KVCacheError as exc:
                code = getattr(grpc.StatusCode, exc.grpc_code)
                context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
                context.abort(code, bounded(str(exc)))
            except Exception as exc:  # abort() raises too; only real failures are not grpc's own
                if code == grpc.StatusCode.OK and not _is_abort(exc):
                    code = grpc.StatusCode.INTERNAL
                    log.exception("internal error in %s", rpc)
                    context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
                raise
            finally:
                seconds = time.perf_counter() - t0
                self.last_call = time.monotonic()
                self.metrics.add(rpc, calls=1, errors=int(code != grpc.StatusCode.OK), seconds=seconds)
                self.calls.observe(rpc, code.name, seconds, getattr(request, "method", "") if rpc == "Attend" else "")
                log.info(LogFields(rpc=rpc, code=code.name, ms=round(seconds * 1e3, 3), peer=context.peer()))

        return run

    return wrap


def _is_abort(exc: Exception) -> bool:
    # context.abort() raises a plain Exception subclass defined inside grpc; recognise it by module.
    return type(exc).__module__.startswith("grpc")


class KVCacheServicer(pb_grpc.KVCacheServicer):
    """The KVCache service over an InProcessClient."""

    def __init__(self, client: InProcessClient, draining: threading.Event | None = None, max_streams: int = 8,
                 limits: InputLimits | None = None, max_message_bytes: int | None = None,
                 quotas: ClientQuotas | None = None) -> None:
        self.client = client
        self.quotas = quotas or ClientQuotas(client.store)
        self.limits = limits or InputLimits()
        self.max_message_bytes = max_message_bytes  # the largest reply gRPC will send
        self.locks = SequenceLocks()
        self.metrics = Totals(("calls", "errors", "seconds"))  # per RPC
        self.calls = CallMetrics(self.stats)  # latency histograms and status counts, for Prometheus
        self.draining = draining or threading.Event()  # set on SIGTERM: new calls are refused
        self.in_flight = _InFlight()
        self.last_call = time.monotonic()  # when a unary call last ended (served or refused)
        # Each open AttendStream holds a worker thread of the sync server for its lifetime; past
        # this many, new streams are refused so unary calls always find a thread.
        self.max_streams = max_streams
        self._streams = 0
        self._streams_lock = threading.Lock()
        self.plans = StepPlans()  # the recent decode steps' plans, by step_id
        self.batcher = AttendBatcher(self._attend_batch)  # attend streams' concurrent requests, merged
        self.local_plane: LocalPlane | None = None  # the same-host data plane, if the server offers one
        self.step_lease_seconds = 10.0  # ServerOptions.step_lease_seconds

    @_handler("Create")
    def Create(self, request, context):
        lease = request.lease_seconds
        if lease < 0 or lease != lease:
            raise InvalidParameter(f"lease_seconds={lease!r} must be a positive number of seconds (0: none)")
        with self.quotas.new_sequence(context.peer()) as own:
            info = self.client.create(list(request.token_ids) or None, lease or None)
            own(info.seq_id)
        return info_to_wire(info)

    @_handler("Fork", lambda r: [r.seq_id])
    def Fork(self, request, context):
        with self.quotas.new_sequence(context.peer()) as own:
            info = self.client.fork(request.seq_id)
            own(info.seq_id)
        return info_to_wire(info)

    @_handler("Free", lambda r: [r.seq_id])
    def Free(self, request, context):
        info = self.client.describe(request.seq_id)
        self.client.free(request.seq_id)
        return info_to_wire(info)

    @_handler("Describe", lambda r: [r.seq_id])
    def Describe(self, request, context):
        return info_to_wire(self.client.describe(request.seq_id))

    @_handler("Append", lambda r: [r.seq_id])
    def Append(self, request, context):
        return info_to_wire(self._append(request, context.peer()))

    def AppendStream(self, request_iterator, context):
        """Chunks of one sequence's prefill, appended in order, each under that sequence's lock.

        Each chunk is an append of its own, committed whole: if one is rejected, the call fails with its
        status and the chunks before it stay appended (describe tells how far the prefill got). The lock is
        taken per chunk, never while waiting for the client's next one, so a stalled client blocks no
        other call on its sequence."""
        with self._stream_slot(context, "append"):
            first = next(request_iterator, None)
            if first is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "AppendStream got no chunk")
            return self._append_chunks(_Chunks(first, request_iterator), context)

    @contextlib.contextmanager
    def _stream_slot(self, context, kind: str) -> Iterator[None]:
        """One of max_streams slots for an open stream (append or attend), which holds a worker thread of the sync
        server for as long as it stays open; past them a stream is refused with RESOURCE_EXHAUSTED (TooManyStreams),
        so unary calls (Health among them) always find a thread."""
        with self._streams_lock:
            admitted = self._streams < self.max_streams
            self._streams += admitted
        if not admitted:
            context.set_trailing_metadata(((ERROR_CLASS_KEY, "TooManyStreams"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_streams} streams already open; {kind} with unary calls instead")
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams -= 1

    @_handler("AppendStream")
    def _append_chunks(self, chunks: _Chunks, context):
        seq_id = chunks.first.seq_id
        with self.locks.hold([seq_id]):
            info = self._append(chunks.first, context.peer())
        for chunk in chunks.rest:  # waits on the client's network input: no lock held here
            if chunk.seq_id and chunk.seq_id != seq_id:
                raise ShapeMismatch(f"AppendStream chunks name two sequences: {seq_id}, {chunk.seq_id}")
            chunk.seq_id = seq_id
            with self.locks.hold([seq_id]):
                info = self._append(chunk, context.peer())
        return info_to_wire(info)

    @_handler("Attend", lambda r: list(r.seq_ids))
    def Attend(self, request, context):
        self._check_quota(request, context.peer())
        return self._attend(request)

    def _check_quota(self, request, client: str) -> None:
        """QuotaExceeded if an attend's new rows would take the client past its page cap."""
        if self.quotas.max_pages and request.HasField("new_k") and not request.step_id:  # a plan took its pages
            store = self.client.store
            self.quotas.admit_pages(client, sum(store.pages_to_append(s, 1, request.layer) for s in request.seq_ids))

    def AttendStream(self, request_iterator, context) -> Iterator[pb.AttendResponse]:
        """Attend calls on one stream; a rejected request is answered in the response and the stream goes on.

        Refused with RESOURCE_EXHAUSTED (error class TooManyStreams) when max_streams are open:
        the client then attends with unary calls."""
        with self._stream_slot(context, "attend"):
            yield from self._serve_stream(request_iterator, context.peer())

    def _serve_stream(self, request_iterator, client: str) -> Iterator[pb.AttendResponse]:
        for request in request_iterator:
            response, finish = self.answer_streamed(request, client, "AttendStream")
            try:
                yield response  # grpc resumes this generator once the response is sent
            finally:
                if finish is not None:
                    finish()

    def serve_streamed(self, request: pb.AttendRequest, client: str, rpc: str) -> pb.AttendResponse:
        """The answer to one attend of a stream (an AttendStream, or the local data plane's socket) from `client`:
        its result or its error, never an exception; counted and logged under `rpc`."""
        response, finish = self.answer_streamed(request, client, rpc)
        if finish is not None:
            finish()
        return response

    def answer_streamed(self, request: pb.AttendRequest, client: str,
                        rpc: str) -> tuple[pb.AttendResponse, Callable[[], None] | None]:
        """serve_streamed's answer, counted, and what is left to do once it is sent (None: nothing).

        An answer's log line is written after it is sent, off the layer call's path; an error's before, so that a
        client that sees an error finds it logged."""
        t0 = time.perf_counter()
        try:
            self._check_quota(request, client)
        except KVCacheError as exc:
            return _error_response(exc), None
        if self.draining.is_set():
            response = error_reply(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "Unavailable")
        else:
            response = self.batcher.submit(request)
        line = self._count_streamed(rpc, request, response, time.perf_counter() - t0)
        if line is None:
            return response, None
        if response.error_code:
            log.info(line)
            return response, None
        return response, functools.partial(log.info, line)

    def _count_streamed(self, rpc: str, request: pb.AttendRequest, response: pb.AttendResponse,
                        seconds: float) -> LogFields | None:
        """Count one answered stream request in the metrics, as a unary call is; its log line, if INFO is logged."""
        code = _CODE_NAMES.get(response.error_code, "UNKNOWN")
        method = request.method or "dense"
        self.calls.observe(rpc, code, seconds, method)
        self.metrics.add(rpc, calls=1, errors=int(response.error_code != 0), seconds=seconds)
        if not log.isEnabledFor(logging.INFO):
            return None
        return LogFields(rpc=rpc, code=code, ms=round(seconds * 1e3, 3), method=method, layer=request.layer,
                         batch=len(request.seq_ids))

    def _attend_batch(self, requests: list) -> list[pb.AttendResponse]:
        """Answers to stream requests that arrived together (AttendBatcher): decoded here, served by the client's
        attend_many (which lets compatible ones share one store call), each answered with its result or error."""
        if len(requests) == 1:
            return [self._attend_alone(requests[0])]
        calls: list[AttendCall | None] = []
        answers: list[pb.AttendResponse | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                calls.append(self._attend_call(request))
            except Exception as exc:
                calls.append(None)
                answers[i] = _error_response(exc)
        live = [i for i, c in enumerate(calls) if c is not None]
        with self.locks.hold([s for i in live for s in calls[i].seq_ids]):
            results, merged = self.client.attend_many([calls[i] for i in live])
        self.batcher.merged_calls += len(merged)  # only the batch's leader runs here
        self.batcher.merged_requests += sum(merged)
        for i, result in zip(live, results):
            answers[i] = self._streamed_answer(result, calls[i])
        return answers

    def _attend_alone(self, request: pb.AttendRequest) -> pb.AttendResponse:
        """The answer to a stream request that arrived alone: what attend_many would give it, without grouping."""
        try:
            call = self._attend_call(request)
        except Exception as exc:
            return _error_response(exc)
        with self.locks.hold(call.seq_ids):
            try:
                result = self.client.attend(call.seq_ids, call.layer, call.q, call.method, call.params, call.new_k,
                                            call.new_v, call.backend, call.plan)
            except Exception as exc:  # answered with its own error, as attend_many answers each call
                result = exc
        return self._streamed_answer(result, call)

    def _streamed_answer(self, result: AttentionResult | Exception, call: AttendCall) -> pb.AttendResponse:
        """A stream request's answer from its result or the error it raised (an unexpected one logged)."""
        if isinstance(result, Exception) and not isinstance(result, KVCacheError):
            log.error("internal error in AttendStream", exc_info=result)
        if not isinstance(result, Exception):
            try:
                return self._attend_response(result, call)
            except KVCacheError as exc:
                result = exc
        return _error_response(result)

    @_handler("Fetch", lambda r: [r.seq_id])
    def Fetch(self, request, context):
        index = from_wire(request.index, "index") if request.HasField("index") else None
        result = self.client.fetch(request.seq_id, request.layer, request.what, index)
        reply = pb.FetchResponse(tensors=[to_wire(t) for t in result.tensors], bytes_read=result.bytes_read)
        limit = self.max_message_bytes
        if limit is not None and reply.ByteSize() > limit:  # refused here, so it is logged and counted as refused
            raise MessageTooLarge(f"the fetch reply would be {reply.ByteSize():,} bytes, over the server's "
                                  f"{limit:,}-byte message limit: fetch fewer rows at a time")
        return reply

    @_handler("Prefetch", lambda r: [r.seq_id])
    def Prefetch(self, request, context):
        return info_to_wire(self.client.prefetch(request.seq_id, list(request.pages) or None))

    @_handler("SparseIndex", lambda r: [r.seq_id])
    def SparseIndex(self, request, context):
        self.limits.check_query_shape(list(request.q.shape), self.client.config)
        index = self.client.sparse_index(*_sparse_chunk(request))
        tensors = (index.block_index, index.block_count, index.column_index, index.column_count)
        return pb.SparseIndexResponse(tensors=[to_wire(t) for t in tensors], block_size=index.block_size,
                                      start=index.start, num_queries=index.num_queries)

    @_handler("SparsePrefill", lambda r: [r.seq_id])
    def SparsePrefill(self, request, context):
        self.limits.check_query_shape(list(request.q.shape), self.client.config)
        result = self.client.sparse_prefill(*_sparse_chunk(request), backend=request.backend or "auto")
        return pb.SparsePrefillResponse(out=to_wire(result.out), lse=to_wire(result.lse), bytes_read=result.bytes_read,
                                        pairs=result.pairs, causal_pairs=result.causal_pairs)

    @_handler("Plan", lambda r: r.seq_ids)
    def Plan(self, request, context):
        if request.new_tokens:
            self._admit_step_pages(context.peer(), request.seq_ids)
        plan = self.client.plan_step(list(request.seq_ids), request.new_tokens)
        self.plans.add(plan)
        return pb.PlanResponse(step_id=plan.step_id)

    @_handler("Verify")
    def Verify(self, request, context):
        report = self.client.verify()
        return pb.VerifyResponse(pages_checked=report["pages_checked"], corrupted_pages=report["corrupted_pages"],
                                 sequences=report["sequences"])

    @_handler("Stats")
    def Stats(self, request, context):
        s = self.stats()
        return pb.StatsResponse(
            pool=s["pool"],
            methods={m: pb.MethodStats(calls=int(t["calls"]), bytes_read=int(t["bytes_read"]), seconds=t["seconds"])
                     for m, t in s["methods"].items()},
            rpcs={r: pb.RpcStats(calls=int(t["calls"]), errors=int(t["errors"]), seconds=t["seconds"])
                  for r, t in s["rpcs"].items()},
            bytes_moved=s["bytes_moved"],
            batching=s["batching"],
            coverage=coverage_to_wire(s["coverage"]),
        )

    @_handler("Health", while_draining=True)
    def Health(self, request, context):
        return pb.HealthResponse(status="DRAINING" if self.draining.is_set() else "SERVING")

    @_handler("Config")
    def Config(self, request, context):
        return config_to_wire(self.client.config)

    def pool_session(self, client: str) -> PoolSession | None:
        """A new engine connection's leases on the shared pool; None if the pool is not shared."""
        store = self.client.store
        if store.pool.segment is None:
            return None
        return PoolSession(store, store.pool.segment, client, self.step_lease_seconds, self._pool_guard,
                           self._count_pool_reads)

    @contextlib.contextmanager
    def _pool_guard(self, client: str, seq_ids: list[str], new_positions: int) -> Iterator[None]:
        """Admit a lease call of `client` on `seq_ids` (one that takes the pages of `new_positions` more positions of
        each), as a unary call on them is admitted."""
        if self.draining.is_set():
            raise Unavailable("server is shutting down")
        if new_positions:
            self._admit_step_pages(client, seq_ids, new_positions)
        with self.in_flight, self.locks.hold(seq_ids):
            yield

    def _admit_step_pages(self, client: str, seq_ids, new_positions: int = 1) -> None:
        """QuotaExceeded if `new_positions` more positions of `seq_ids` would take `client` past its page cap (only
        counted under a cap)."""
        if self.quotas.max_pages:
            store = self.client.store
            self.quotas.admit_pages(client, sum(store.pages_to_append(s, new_positions) for s in seq_ids
                                                if store.has_sequence(s)))

    def _count_pool_reads(self, method: str, stats: pb.MethodStats) -> None:
        self.client.counters.add(method[:64], calls=stats.calls, bytes_read=stats.bytes_read, seconds=stats.seconds)

    @_handler("OpenDataPlane")
    def OpenDataPlane(self, request, context):
        if self.local_plane is None:
            return pb.DataPlaneOffer()
        return self.local_plane.offer(context.peer())

    def stats(self) -> dict:
        """Pool usage, per-method and per-RPC totals, and how attend-stream requests were batched."""
        return {**self.client.stats(), "rpcs": self.metrics.snapshot(), "batching": self.batcher.counts()}

    # ---- helpers -------------------------------------------------------------------------

    def _append(self, request, client: str):
        if not request.HasField("k") or not request.HasField("v"):
            raise ShapeMismatch("append needs both k and v")
        k, v = from_wire(request.k, "k"), from_wire(request.v, "v")
        self.limits.check_finite(k, "k", request.k.data)
        self.limits.check_finite(v, "v", request.v.data)
        if self.quotas.max_pages and k.dim() >= 3:
            layer = request.layer if request.HasField("layer") else None
            self.quotas.admit_pages(client, self.client.store.pages_to_append(request.seq_id, k.shape[-3], layer))
        return self.client.append(
            request.seq_id, k, v,
            layer=request.layer if request.HasField("layer") else None,
            start=request.start if request.HasField("start") else None,
            token_ids=list(request.token_ids) or None,
        )

    def _attend(self, request) -> pb.AttendResponse:
        c = self._attend_call(request)
        return self._attend_response(self.client.attend(c.seq_ids, c.layer, c.q, c.method, c.params, c.new_k,
                                                        c.new_v, c.backend, c.plan), c)

    def _attend_call(self, request) -> AttendCall:
        """An AttendRequest's arguments, decoded and checked against the server's input limits (ShapeMismatch or
        DTypeMismatch for a malformed tensor, InvalidParameter for non-finite values or too many query heads,
        PlanStale for an unknown step)."""
        if not request.HasField("q"):
            raise ShapeMismatch("attend needs q")
        params = self._check_size(request)  # from the wire shape, before the tensor is decoded: nothing is allocated
        q = from_wire(request.q, "q")
        new_k = from_wire(request.new_k, "new_k") if request.HasField("new_k") else None
        new_v = from_wire(request.new_v, "new_v") if request.HasField("new_v") else None
        for name, t in (("q", q), ("new_k", new_k), ("new_v", new_v)):
            if t is not None:
                self.limits.check_finite(t, name, getattr(request, name).data)
        return AttendCall(list(request.seq_ids), request.layer, q, request.method or "dense",
                          params_from_wire(request.params) if params is None else params, new_k=new_k, new_v=new_v,
                          backend=request.backend or "auto",
                          plan=self.plans.get(request.step_id) if request.step_id else None)

    def _check_size(self, request) -> dict | None:
        """The query-head limit and, for a large request, the working-memory estimate of an attend, from q's wire
        shape (a q that is not [B, Hq, d] is left to the decode's own checks); the request's parameters, where it
        read them."""
        shape = list(request.q.shape)
        if len(shape) != 3:
            return None
        self.limits.check_query_shape(shape, self.client.config)
        if request.ByteSize() <= EARLY_ESTIMATE_BYTES:
            return None
        store = self.client.store
        m = lookup(request.method or "dense")
        lens = store.lengths(list(request.seq_ids), request.layer)
        params = params_from_wire(request.params)
        p = m.parse(resolved_params(store, m, params, request.layer, [n + 1 for n in lens]))
        check_work(store, m, lens, shape[1], p)
        return params

    def _attend_response(self, result: AttentionResult, call: AttendCall) -> pb.AttendResponse:
        # Each torch call costs microseconds of a layer call's host time: a host result needs no copy.
        out = result.out if result.out.is_cpu else result.out.cpu()
        lse = result.lse if result.lse.is_cpu else result.lse.cpu()
        response = pb.AttendResponse(bytes_read=result.bytes_read)
        # Filled in place: a Tensor message passed to the constructor would be built, then copied.
        data = fill_wire(response.out, out), fill_wire(response.lse, lse)
        self.limits.check_result(out, lse, data)
        coverage = result.coverage
        if coverage is not None and not coverage.is_cpu:
            coverage = coverage.cpu()
            # Read back with the reply, which syncs anyway; a host result was counted by the client already.
            self.client.count_coverage(call.method, call.layer, coverage, result.fallback)
        if result.bytes_moved:
            response.bytes_moved.update(result.bytes_moved)
        if result.fallback is not None:
            response.fallback.extend(result.fallback.tolist())
        if coverage is not None:
            fill_wire(response.coverage, coverage)
        return response


class StepPlans:
    """The most recent `capacity` step plans by step_id; an older one is forgotten (its step must plan again)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._plans: OrderedDict[str, StepPlan] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, plan: StepPlan) -> None:
        """Keep `plan`, forgetting the oldest past capacity."""
        with self._lock:
            self._plans[plan.step_id] = plan
            while len(self._plans) > self.capacity:
                self._plans.popitem(last=False)

    def get(self, step_id: str) -> StepPlan:
        """The plan of `step_id`; PlanStale if it is unknown or forgotten."""
        with self._lock:
            plan = self._plans.get(step_id)
        if plan is None:
            raise PlanStale(f"no plan {step_id[:32]!r} on this server (unknown, or forgotten): plan the step again")
        return plan




_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
LEASE_CHECK_SECONDS = 0.25  # how often the server frees sequences whose lease ran out
# An attend's working memory is estimated from its wire shape before its tensors are decoded only past this many
# bytes, where decoding would copy much: the store call estimates it again (as if each sequence held one more
# position, so at least as strictly) before it writes or reads anything, and on a layer call's few kilobytes a
# second estimate costs more than the decode it would spare.
EARLY_ESTIMATE_BYTES = 1 << 16
MAX_ERROR_TEXT = 2000  # characters: an error's text must fit a client's metadata limit whatever the request held


def default_call_memory(config: KVCacheConfig) -> int:
    """Working memory one attend may need unless --max-call-memory says otherwise, in bytes: 256 MiB plus the bytes
    of every page the store holds. A call over the whole store in one sequence stays below it (its K/V of one layer
    is 2/(3L) of the pages' bytes, upcast and with its scores), so only a call whose size comes from the request
    rather than the store is refused."""
    return 256 * 2**20 + config.total_pages * config.page_bytes


def bounded(text: str) -> str:
    """An error's text cut to MAX_ERROR_TEXT characters."""
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 30] + f"... ({len(text)} characters)"


def _error_response(exc: Exception) -> pb.AttendResponse:
    """An attend stream's answer to a failed request: kvcache errors by their status code, anything else INTERNAL."""
    if isinstance(exc, KVCacheError):
        return error_reply(getattr(grpc.StatusCode, exc.grpc_code), bounded(str(exc)), type(exc).__name__)
    return error_reply(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", "RemoteError")


def _sparse_chunk(request) -> tuple:
    """(seq_id, layer, q, start, head patterns, block size) of a SparseIndexRequest."""
    if not request.HasField("q"):
        raise ShapeMismatch("a sparse prefill chunk needs q")
    if request.heads:
        patterns = [HeadPattern(h.pattern, dict(h.sizes)) for h in request.heads]
    elif request.pattern:
        patterns = HeadPattern(request.pattern, dict(request.sizes))
    else:
        raise InvalidParameter("name a pattern (with its sizes) or give one per head")
    return (request.seq_id, request.layer, from_wire(request.q, "q"), request.start, patterns,
            request.block_size or BLOCK_SIZE)


class _BearerToken(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str, on_refused: Callable[[str], None]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused  # told the RPC's name of every refused call

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if handler is None or hmac.compare_digest(given.encode(), self._expected):
            return handler
        self._on_refused(details.method.rsplit("/", 1)[-1])

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        def deny_stream(request_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(deny_stream if handler.request_streaming else deny,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def share_pool_problem(config: KVCacheConfig, options: ServerOptions) -> None:
    """InvalidParameter if `options` ask to share a pool that cannot be shared, or give a lease no time."""
    if not options.step_lease_seconds > 0:
        raise InvalidParameter(f"--step-lease-seconds {options.step_lease_seconds}: expected a positive number")
    if options.share_pool and (config.tiered or not options.local_plane):
        raise InvalidParameter("--share-pool needs an untiered store (no --host-pages or --disk-pages) and the local "
                               "data plane")


class Server:
    """A running `kvcache serve`: the gRPC server, its servicer, optional metrics endpoint."""

    def __init__(self, config: KVCacheConfig, options: ServerOptions) -> None:
        self.options = options
        self.draining = threading.Event()
        pool = None
        if options.share_pool:
            share_pool_problem(config, options)
            nbytes = PagePool.regions(config)[1]
            segment = (CudaSegment(nbytes, config.device) if config.device.type == "cuda"
                       else SharedSegment(nbytes, name="kvcache-pool"))
            if isinstance(segment, CudaSegment):
                segment.handle()  # exported once, now: making the handle swaps the storage's deleter
            pool = PagePool(config, segment)
        client = InProcessClient(KVStore(config, pool))
        client.store.max_call_bytes = options.max_call_memory or default_call_memory(config)
        self.servicer = KVCacheServicer(client, self.draining,
                                        max_streams=max(1, options.workers // 2),
                                        limits=InputLimits(options.reject_nonfinite, options.max_query_heads),
                                        max_message_bytes=options.max_message_mb * 2**20,
                                        quotas=ClientQuotas(client.store, options.max_sequences_per_client,
                                                            options.max_pages_per_client))
        self.servicer.step_lease_seconds = options.step_lease_seconds
        if options.gate:
            attach_gate(self.servicer.client.store, options.gate)  # GateMissing / GateFileInvalid: no server
        if options.allocation:
            attach_allocation(self.servicer.client.store, options.allocation)  # AllocationInvalid: no server
        limit = options.max_message_mb * 2**20
        interceptors = [_BearerToken(options.token, self._refused)] if options.token else []
        # torch.set_num_threads is per thread for OpenMP: set it in every RPC thread, not only main.
        init = (lambda: torch.set_num_threads(options.torch_threads)) if options.torch_threads else None
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="kvcache-rpc", initializer=init),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        pb_grpc.add_KVCacheServicer_to_server(self.servicer, self.grpc)
        address = f"{options.host}:{options.port}"
        if options.tls_cert or options.tls_key:
            with open(options.tls_key, "rb") as key, open(options.tls_cert, "rb") as cert:
                creds = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        self._reaper_stop = threading.Event()
        self.metrics_http = None
        if options.metrics_port is not None:
            self.metrics_http = serve_metrics(options.metrics_host, options.metrics_port, self.servicer.calls.text,
                                              token=options.token)

    def start(self) -> None:
        """Start serving; logs the bound address (port 0 picks a free one)."""
        self.trimmer = HeapTrimmer(slack=self.options.max_message_mb * 2**20)  # the store is allocated by now
        if self.options.local_plane:
            self.servicer.local_plane = LocalPlane(
                lambda request, client: self.servicer.answer_streamed(request, client, "AttendLocal"),
                self.options.max_message_mb * 2**20, ticket_seconds=30.0, pool=self.servicer.pool_session)
        self.grpc.start()
        self._reaper = threading.Thread(target=self._reap_leases, daemon=True, name="kvcache-leases")
        self._reaper.start()
        extra = {"metrics_port": self.metrics_http.server_address[1]} if self.metrics_http else {}
        log.info(json.dumps({"event": "listening", "host": self.options.host, "port": self.port,
                             "tls": bool(self.options.tls_cert), "auth": bool(self.options.token), **extra}))

    def _reap_leases(self) -> None:
        """Every LEASE_CHECK_SECONDS: free the sequences whose lease has run out (each under its lock: a call in
        flight on it renewed the lease, so it stays), and give freed heap memory back if the server has grown."""
        store = self.servicer.client.store
        while not self._reaper_stop.wait(LEASE_CHECK_SECONDS):
            for lease in store.leases.overdue():
                with self.servicer.locks.hold(list(lease.plan.seq_ids)):
                    store.abort_lease(lease)
                log.info(json.dumps({"event": "step_lease_expired", "step_id": lease.step_id}))
            for seq_id in store.expired():
                with self.servicer.locks.hold([seq_id]):
                    if store.free_if_expired(seq_id):
                        log.info(json.dumps({"event": "lease_expired", "seq_id": seq_id}))
            self.servicer.quotas.prune()
            self.trimmer.check()

    def _refused(self, rpc: str) -> None:
        """Count and log a call refused for its bearer token (the token is never logged)."""
        self.servicer.metrics.add(rpc, calls=1, errors=1, seconds=0.0)
        self.servicer.calls.observe(rpc, "UNAUTHENTICATED", 0.0)
        log.warning(json.dumps({"rpc": rpc, "code": "UNAUTHENTICATED", "refused": "missing or wrong bearer token"}))

    def drain_and_stop(self) -> None:
        """Refuse new calls (UNAVAILABLE), let in-flight ones finish within the grace period, stop."""
        self.draining.set()
        log.info(json.dumps({"event": "draining", "grace_s": self.options.grace_seconds}))
        # Keep accepting (and refusing with UNAVAILABLE) until in-flight calls are done, so late
        # callers see UNAVAILABLE rather than a cancelled connection; open streams end at stop().
        deadline = time.monotonic() + self.options.grace_seconds
        idle = self.servicer.in_flight.wait_idle(self.options.grace_seconds)
        # Calls already queued for a worker thread are not in flight yet: keep answering them
        # (UNAVAILABLE) until the server has been quiet for a moment, one second at most, so that clients
        # that keep calling (a health poll) cannot hold the drain open.
        quiet_by = min(deadline, time.monotonic() + 1.0)
        while idle and time.monotonic() - self.servicer.last_call < 0.2 and time.monotonic() < quiet_by:
            time.sleep(0.05)
        self._reaper_stop.set()
        self._reaper.join(timeout=5)
        self.grpc.stop(0 if idle else 1).wait()
        if self.servicer.local_plane is not None:
            self.servicer.local_plane.close()
        if self.metrics_http:
            self.metrics_http.shutdown()
        recorded = self.servicer.client.store.close()
        log.info(json.dumps({"event": "stopped", **({"disk_prefix_pages": recorded} if recorded else {})}))


def run_server(server: Server) -> None:
    """Start `server`, serve until SIGTERM or SIGINT, then drain and stop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    # Poll: a signal delivered to another thread only runs its handler when the main thread wakes.
    while not stop.wait(0.2):
        pass
    server.drain_and_stop()
