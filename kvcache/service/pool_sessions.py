"""PoolSession: one engine connection that leases decode steps on the server's shared page pool (docs/architecture.md,
"Shared pool"; docs/wire-protocol.md).

With `kvcache serve --share-pool` the page pool lies in shared memory. An engine on the same host maps it and runs
each step's appends and attention itself, inside its own process (and its own CUDA graph where it has one); the
server stays the one owner of allocation, the prefix cache and the sequences' bookkeeping. Per step the engine makes
one call on the local data plane's socket: end the previous step (commit or abort) and lease the next. A lease holds
its sequences against every other change until it ends, and ends by itself after `lease_seconds`; a connection that
closes aborts its step at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import torch

from kvcache.config import SUMMARY_DTYPE
from kvcache.errors import InvalidParameter, KVCacheError, PlanStale, QuotaExceeded
from kvcache.store import KVStore
from kvcache.store.shared_segment import CudaSegment, Region, SharedEvent, SharedSegment
from kvcache.store.step_leases import StepLease
from kvcache.wire import kvcache_pb2 as pb
from kvcache.wire.messages import cuda_handle_to_wire

WORKSPACE_SLOTS = 256  # sequences one lease may hold (their value sums travel through the workspace)
# Steps one lease may hold: the pages of that many new positions per sequence are taken at once (and the unused ones
# given back when it ends), and the sequences are held from other callers for as long.
MAX_LEASE_STEPS = 64


class PoolSession:
    """The leases of one connection: its value-sum workspace and the lease it holds.

    `guard(client, seq_ids, new_positions)` is the servicer's admission of a call on those sequences (draining, the
    page quota of a lease that takes the pages of new positions, and their per-sequence locks), used as a context
    manager; `count(method, stats)` books what the engine's attention read."""

    def __init__(self, store: KVStore, segment: SharedSegment | CudaSegment, client: str, lease_seconds: float,
                 guard: Callable[[str, list[str], int], object], count: Callable[[str, pb.MethodStats], None]) -> None:
        c = store.config
        self.store = store
        self.segment = segment
        self.client = client
        self.lease_seconds = lease_seconds
        self._guard = guard
        self._count = count
        shape = (WORKSPACE_SLOTS, c.num_layers, c.num_kv_heads, c.head_dim)
        region = Region(0, shape, SUMMARY_DTYPE)
        self.cuda = c.device.type == "cuda"
        if self.cuda:
            self.workspace: SharedSegment | CudaSegment = CudaSegment(region.nbytes, c.device)
            # GPU work on the shared memory is ordered by events: the engine's stream waits for the server's last
            # copies of a lease, the server's for the engine's last writes of a step (nothing waits on the host).
            self.server_event, self.engine_event = SharedEvent(c.device), SharedEvent(c.device)
        else:
            self.workspace = SharedSegment(region.nbytes, name="kvcache-sums")
        self.sums = self.workspace.tensor(region)
        self.lease: StepLease | None = None
        self._lock = threading.Lock()

    def offer(self) -> tuple[pb.PoolOffer, list[int]]:
        """The PoolOffer frame and the descriptors that go with it (pool, workspace; none for a GPU store, whose
        segments travel as CUDA IPC handles in the offer)."""
        offer = pb.PoolOffer(pool_bytes=self.segment.nbytes, workspace_bytes=self.workspace.nbytes,
                             workspace_slots=WORKSPACE_SLOTS, lease_seconds=self.lease_seconds)
        if not self.cuda:
            return offer, [self.segment.fd, self.workspace.fd]
        for segment in (self.segment, self.workspace):
            offer.cuda.append(cuda_handle_to_wire(segment.handle()))
        offer.server_event, offer.engine_event = self.server_event.handle(), self.engine_event.handle()
        offer.scratch_page = self.store.reserve_scratch_page()
        return offer, []

    def serve(self, request: pb.LeaseRequest) -> pb.LeaseReply:
        """End the previous step as the request says, then lease the next: the reply, or the error it carries."""
        with self._lock:
            try:
                for method, stats in request.methods.items():
                    self._count(method, stats)
                if request.done_step_id:
                    self._end(request.done_step_id, request.done_steps)
                if not request.seq_ids:
                    return pb.LeaseReply()
                return self._lease(list(request.seq_ids), min(max(request.steps, 1), MAX_LEASE_STEPS))
            except KVCacheError as exc:
                code = getattr(grpc.StatusCode, exc.grpc_code)
                return pb.LeaseReply(error_code=code.value[0], error_message=str(exc)[:2000],
                                     error_class=type(exc).__name__)

    def close(self) -> None:
        """The engine went away: abort the step it holds and unmap its workspace."""
        with self._lock:
            if self.lease is not None:
                self.store.abort_lease(self.lease)
                self.lease = None
            self.workspace.close()

    def _engine_done(self) -> None:
        """Order what the server does next on the pool after the engine's last GPU writes (whoever ends the lease:
        this connection, the reaper, or a change that meets it past its deadline)."""
        self.engine_event.wait()

    def _end(self, step_id: str, steps: int) -> None:
        lease, self.lease = self.lease, None
        if lease is None or lease.step_id != step_id:
            if lease is not None:
                self.store.abort_lease(lease)
            raise PlanStale(f"step {step_id} is not this connection's leased step (it ended already, or never was)")
        committed = False
        try:
            with self._guard(self.client, list(lease.plan.seq_ids), 0):
                if steps:
                    self.store.commit_lease(lease, self.sums[: len(lease.seqs)], steps)
                    committed = True
        finally:
            if not committed:  # aborted as asked, or refused (a draining server): never left open
                self.store.abort_lease(lease)

    def _lease(self, seq_ids: list[str], steps: int) -> pb.LeaseReply:
        if len(seq_ids) > WORKSPACE_SLOTS:
            raise InvalidParameter(f"a step over the shared pool holds at most {WORKSPACE_SLOTS} sequences, "
                                   f"not {len(seq_ids)}")
        if self.lease is not None:  # a step neither committed nor aborted: it did not finish
            self.store.abort_lease(self.lease)
            self.lease = None
        try:
            with self._guard(self.client, seq_ids, steps):
                lease = self.store.lease_step(seq_ids, self.lease_seconds, self._engine_done if self.cuda else None,
                                              steps)
        except QuotaExceeded:
            if steps == 1:
                raise
            return self._lease(seq_ids, 1)  # the quota holds the pages of one step, if of no more
        self.lease = lease
        torch.stack([seq.value_sum for seq in lease.seqs], out=self.sums[: len(seq_ids)])
        if self.cuda:
            self.server_event.record()  # the plan's page copies and these sums, before the engine's step
        counts = [seq.num_pages for seq in lease.seqs]
        pages = torch.cat([seq.live_pages for seq in lease.seqs]).tolist()
        return pb.LeaseReply(step_id=lease.step_id, start_lengths=lease.plan.start_lengths, page_counts=counts,
                             pages=pages, steps=lease.steps)
