"""KVStore: sequences over a page pool: create / fork / free / append, and what attention reads."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from kvcache.config import SUMMARY_DTYPE, KVCacheConfig
from kvcache.errors import (
    InvalidParameter,
    PlanStale,
    PositionOutOfRange,
    SequenceNotFound,
    ShapeMismatch,
    StoreFull,
)
from kvcache.kernels.append_rows import append_rows_triton
from kvcache.store.allocator import PageAllocator
from kvcache.store.append_checks import (
    as_token_list,
    check_kv,
    check_layers,
    check_lease,
    check_start,
    new_token_ids,
    validate_kv,
)
from kvcache.store.host_copy import ints_to_device, on_device
from kvcache.store.page_pool import PagePool
from kvcache.store.page_table import PageTableCSR, SequenceState, build_csr
from kvcache.store.prefix_cache import acquire_prefix, register_full_pages
from kvcache.store.row_reads import Moves, page_keys, read_positions
from kvcache.store.step_leases import StepLease, StepLeases, leased_error
from kvcache.store.step_plan import StepPlan, StepRows
from kvcache.store.tier_manager import TierManager
from kvcache.store.tiers import DEVICE
from kvcache.store.warm_restart import restore_prefix_pages


@dataclass(frozen=True)
class SequenceInfo:
    """What a client may know of a sequence: its id, cached positions per layer, pages, prefix hits."""

    seq_id: str
    lengths: tuple[int, ...]
    num_pages: int
    cached_tokens: int

    @property
    def length(self) -> int:
        """Positions cached in every layer (the minimum over layers)."""
        return min(self.lengths)


@dataclass(frozen=True)
class LayerView:
    """The pool tensors of one layer, as attention methods and kernels take them."""

    k_seq: torch.Tensor  # [N, Hkv, P, d]
    k_dim: torch.Tensor  # [N, Hkv, d, P]
    v_seq: torch.Tensor  # [N, Hkv, P, d]
    k_summary: torch.Tensor  # [N, Hkv, 3, d] float32


class KVStore:
    """A paged KV cache for one model: every public method validates its input before changing state."""

    def __init__(self, config: KVCacheConfig, pool: PagePool | None = None) -> None:
        self.config = config
        self.pool = PagePool(config) if pool is None else pool  # given: in shared memory (kvcache serve --share-pool)
        p = self.pool  # made once: four tensor views per layer call otherwise
        self._views = [LayerView(p.k_seq[i], p.k_dim[i], p.v_seq[i], p.k_summary[i]) for i in range(config.num_layers)]
        # Decode rows are written by kvcache.kernels.append_rows on CUDA (it takes d as one power-of-two block);
        # `kvcache bench layer-call` turns it off to time the torch path in the same run.
        self.triton_append = config.head_dim & (config.head_dim - 1) == 0
        self.allocator = PageAllocator(config.total_pages)
        self._refcounts = self.allocator.refcount.numpy()  # a view: the allocator updates its tensor in place
        # Lower tiers, when configured: k_seq/v_seq of cold pages leave the device (kvcache.store.tier_manager).
        self.tiers = TierManager(config, self.pool) if config.tiered else None
        self.pages_restored = self.pages_dropped_at_start = 0  # prefix pages found on a persistent disk tier
        if self.tiers is not None:
            self.tiers.owner_of = self._owners_of
            self.tiers.prefix_key_of = self.allocator.key_of
            adopted, self.pages_dropped_at_start = restore_prefix_pages(self.allocator, self.pool, self.tiers)
            self.pages_restored = len(adopted)
        self._seqs: dict[str, SequenceState] = {}
        self.leases = StepLeases()  # steps whose rows an engine writes in the shared pool (lease_step)
        self.sequences_expired = 0  # freed because their lease ran out
        # Working memory one attend may need (AttentionMethod.work_bytes), in bytes; None: no limit. The server sets
        # it, so that a request's size, not only the store's, cannot exhaust the machine.
        self.max_call_bytes: int | None = None
        self._scratch_page: int | None = None  # reserve_scratch_page
        # One lock for the page bookkeeping; the service adds per-sequence ordering on top.
        self._lock = threading.RLock()
        # Called as fn(layers, page_ids, page_indexes, fills) after those pages' key summaries change, with
        # the pages' positions in their sequences and the rows each holds (kvcache.methods.gate_store keeps gate
        # keys from them).
        self.summary_listeners: list[Callable[[list[int], torch.Tensor, torch.Tensor, list[int]], None]] = []

    # ---- lifecycle -------------------------------------------------------------------------

    def create(self, token_ids: Sequence[int] | None = None, lease_seconds: float | None = None) -> SequenceInfo:
        """New sequence; full pages of `token_ids` already in the prefix cache are reused, not rewritten. With a
        lease, the sequence is freed once no call has named it for `lease_seconds` (expire_leases)."""
        check_lease(lease_seconds)
        with self._lock:
            seq = SequenceState(self._new_id(), self.config)
            seq.lease_seconds = lease_seconds
            if lease_seconds is not None:  # a sequence no call ever names again expires too
                seq.lease_deadline = time.monotonic() + lease_seconds
            if token_ids is not None:
                seq.token_ids = as_token_list(token_ids)
                self._reuse_prefix(seq)
            self._seqs[seq.seq_id] = seq
            return self._info(seq)

    def fork(self, seq_id: str) -> SequenceInfo:
        """New sequence sharing all of `seq_id`'s pages; a shared partial page is copied on write."""
        with self._lock:
            parent = self._get(seq_id)
            self._check_unleased(seq_id)
            child = parent.clone_as(self._new_id())
            if child.lease_seconds is not None:  # the child's lease runs from now, named again or not
                child.lease_deadline = time.monotonic() + child.lease_seconds
            self.allocator.share(child.live_pages)
            parent.generation += 1  # its pages are shared now: a plan of the parent's step no longer holds
            self._seqs[child.seq_id] = child
            return self._info(child)

    def free(self, seq_id: str) -> None:
        """Drop a sequence; its pages return to the free list once no other sequence holds them."""
        with self._lock:
            seq = self._get(seq_id)
            self._check_unleased(seq_id)
            self._release(seq.live_pages)
            del self._seqs[seq_id]

    def describe(self, seq_id: str) -> SequenceInfo:
        """Lengths, page count and prefix-cache hits of a sequence."""
        with self._lock:
            return self._info(self._get(seq_id))

    def verify(self) -> dict[str, object]:
        """A scrub of every lower-tier page (page and row checksums): pages checked, the pages that failed
        (quarantined from now on) and the sequences holding them."""
        with self._lock:
            if self.tiers is None:
                return {"pages_checked": 0, "corrupted_pages": [], "sequences": []}
            checked, failed = self.tiers.verify_all()
            bad = set(failed)
            owners = [s.seq_id for s in self._seqs.values() if bad & set(s.live_pages.tolist())]
            return {"pages_checked": checked, "corrupted_pages": failed, "sequences": owners}

    def expired(self, now: float | None = None) -> list[str]:
        """Ids of the sequences whose lease has run out (at time.monotonic() `now`)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [sid for sid, seq in self._seqs.items() if seq.lease_deadline < now]

    def free_if_expired(self, seq_id: str, now: float | None = None) -> bool:
        """Free `seq_id` if its lease has still run out (a call may have renewed it since expired()); counted in
        pool_usage()["sequences_expired"]."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seq = self._seqs.get(seq_id)
            if seq is None or seq.lease_deadline >= now:
                return False
            step = self.leases.of(seq_id)
            if step is not None and step.deadline >= now:  # an engine is writing its step: its lease decides
                return False
            if step is not None:
                self.abort_lease(step)
            self._release(seq.live_pages)
            del self._seqs[seq_id]
            self.sequences_expired += 1
            return True

    def pages_held(self, seq_ids: Iterable[str]) -> int:
        """Pages the live sequences among `seq_ids` hold (a page shared by two counts twice)."""
        with self._lock:
            return sum(self._seqs[s].num_pages for s in seq_ids if s in self._seqs)

    def pages_to_append(self, seq_id: str, num_new: int, layer: int | None = None) -> int:
        """New pages an append of `num_new` positions to `seq_id` (at `layer`, or every layer) would take (copies of
        shared pages aside); 0 for an unknown layer (the append itself refuses it)."""
        with self._lock:
            seq = self._get(seq_id)
            if layer is not None and not 0 <= layer < self.config.num_layers:
                return 0
            held = seq.lengths[layer] if layer is not None else max(seq.lengths)
            return max(0, self.config.pages_for(held + num_new) - seq.num_pages)

    def close(self) -> int:
        """Record every prefix-cache page on a persistent disk tier and release its directory; returns the pages
        recorded there (0 without one). The store must not be used afterwards."""
        with self._lock:
            if self.tiers is None:
                return 0
            recorded = self.tiers.persist_prefix()
            for storage in self.tiers.storage.values():
                if storage.files is not None:
                    storage.files.close()
            return recorded

    def has_sequence(self, seq_id: str) -> bool:
        """Whether `seq_id` names a live sequence (without renewing its lease)."""
        return seq_id in self._seqs

    def sequence_ids(self) -> list[str]:
        """Ids of the live sequences."""
        with self._lock:
            return list(self._seqs)

    # ---- append ----------------------------------------------------------------------------

    def append(
        self,
        seq_id: str,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: int | None = None,
        start: int | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> SequenceInfo:
        """Write K/V for T new positions: k, v [L, T, Hkv, d] for all layers, or [T, Hkv, d] for `layer`.

        Both key layouts, the touched pages' summaries and the value sums are updated in one
        vectorised pass. `start`, if given, must equal the current length (positions in order).
        """
        with self._lock:
            seq = self._get(seq_id)
            self._check_unleased(seq_id)
            layers = check_layers(self.config, layer)
            k, v = check_kv(self.config, k, v, layer)
            num_new = k.shape[1]
            start = check_start(seq, layers, start)
            end = start + num_new
            new_ids = [] if token_ids is None else new_token_ids(seq, start, as_token_list(token_ids), num_new)

            P = self.config.page_size
            if num_new == 1 and len(layers) == 1:
                self._prepare_pages(seq, start // P, self.config.pages_for(end))
                self._write_decode_rows(layers[0], [seq], k[0], v[0])
            else:
                need = self._pages_needed(seq, num_new, layer)
                if need > self.allocator.num_free:
                    raise StoreFull(f"appending {num_new} positions: need {need} free pages, only "
                                    f"{self.allocator.num_free} of {self.allocator.num_pages} are free")
                # A tiered store writes on the device a chunk at a time; earlier chunks go down a tier.
                chunks = [(0, num_new)] if self.tiers is None else self._plan_chunks(seq, start, num_new)
                for s0, s1 in chunks:
                    self._prepare_pages(seq, (start + s0) // P, self.config.pages_for(start + s1))
                    self._append_rows(seq, layers, start + s0, start + s1, k[:, s0:s1], v[:, s0:s1])
            for layer_idx in layers:
                seq.lengths[layer_idx] = end
            seq.token_ids.extend(new_ids)
            self._register(seq)
            return self._info(seq)

    def append_tokens(self, seq_ids: Sequence[str], k: torch.Tensor, v: torch.Tensor, layer: int) -> None:
        """Append one position to each of `seq_ids` at `layer` (k, v [B, Hkv, d]): all or nothing."""
        with self._lock:
            check_layers(self.config, layer)
            seqs = [self._get(s) for s in seq_ids]
            if len(set(seq_ids)) != len(seq_ids):
                raise InvalidParameter("a sequence appears twice in one append")
            for seq_id in seq_ids:
                self._check_unleased(seq_id)
            validate_kv(self.config, k, v, layer)  # [B, Hkv, d]: the batch checked as T positions
            if k.shape[0] != len(seqs):
                raise ShapeMismatch(f"k holds {k.shape[0]} rows for {len(seqs)} sequences")
            dev = self.config.device
            if not (on_device(k, dev) and on_device(v, dev)):
                k, v = k.to(dev), v.to(dev)
            need = sum(self._pages_needed(seq, 1, layer) for seq in seqs)
            if need > self.allocator.num_free:
                raise StoreFull(f"appending to {len(seqs)} sequences needs {need} free pages; "
                                f"{self.allocator.num_free} are free")
            P = self.config.page_size
            for seq in seqs:
                start = seq.lengths[layer]
                self._prepare_pages(seq, start // P, self.config.pages_for(start + 1))
            self._write_decode_rows(layer, seqs, k, v)
            for seq in seqs:
                seq.lengths[layer] += 1
                self._register(seq)

    # ---- plan once per step ----------------------------------------------------------------

    def plan_step(self, seq_ids: Sequence[str], new_tokens: int = 1, page_table: bool = True) -> StepPlan:
        """Plan a decode step of `seq_ids` in which every layer's call appends `new_tokens` (0 or 1) positions:
        the sequences checked, the pages of the new positions made ready (allocated, or copied where shared), and
        the batch's page table on the device for the lengths each layer reaches, unless `page_table` is False
        (docs/architecture.md)."""
        if isinstance(new_tokens, bool) or new_tokens not in (0, 1):
            raise InvalidParameter(f"a step appends 0 or 1 positions per sequence, not {new_tokens!r}")
        with self._lock:
            if len(seq_ids) == 0:
                raise ShapeMismatch("a step needs at least one sequence")
            if len(set(seq_ids)) != len(seq_ids):
                raise InvalidParameter("a sequence appears twice in one step")
            seqs = [self._get(s) for s in seq_ids]
            for seq_id in seq_ids:
                self._check_unleased(seq_id)
            uneven = [s.seq_id for s in seqs if min(s.lengths) != max(s.lengths)]
            if uneven:
                raise InvalidParameter(f"sequence {uneven[0]} is part way through a step (its layers hold "
                                       f"{sorted(set(self._get(uneven[0]).lengths))} positions): plan between steps")
            starts = [s.lengths[0] for s in seqs]
            P = self.config.page_size
            if new_tokens:
                need = sum(self._pages_needed(seq, 1, None) for seq in seqs)
                if need > self.allocator.num_free:
                    raise StoreFull(f"planning a step of {len(seqs)} sequences needs {need} free pages; "
                                    f"{self.allocator.num_free} are free")
                for seq, start in zip(seqs, starts):
                    self._prepare_pages(seq, start // P, self.config.pages_for(start + 1))
            # A leased step's page table is built where it runs, in the engine: none here.
            csr = build_csr(seqs, 0, self.config.device, [n + new_tokens for n in starts]) if page_table else None
            return StepPlan(tuple(seq_ids), new_tokens, tuple(starts), tuple(s.generation for s in seqs), csr)

    def plan_rows(self, seq_ids: Sequence[str]) -> StepRows:
        """Plan a decode step that appends one position per layer call (plan_step), and where each sequence's new
        row goes in every layer: append_planned then writes a layer's rows with no host work per call."""
        with self._lock:
            plan = self.plan_step(seq_ids, 1)
            seqs = [self._seqs[s] for s in seq_ids]
            rows = self._row_targets(seqs, plan.start_lengths)
            tables = None
            if self.config.device.type == "cuda" and self.triton_append and self.tiers is None:
                L = self.config.num_layers
                flat = [x for layer in range(L) for x in self._append_columns(layer, seqs, rows)]
                # Pinned and sent without blocking: a pageable copy would wait for the previous step's replay.
                tables = ints_to_device(flat, self.config.device).view(L, 4, len(seqs))
            page_ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
            targets = self.pool.row_targets(rows, self.config.device) if tables is None else None
            return StepRows(plan, seqs, rows, page_ids, tables, [False] * self.config.num_layers, targets)

    def append_planned(self, step: StepRows, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, Hkv, d] (on the device) as the new row of each of the step's sequences at `layer`, where
        plan_rows put them; PlanStale if a sequence was freed, forked or appended to outside the step since."""
        with self._lock:
            plan = step.plan
            if step.written[layer]:
                raise PlanStale(f"layer {layer} of this step was written already")
            for seq, seq_id, start, generation in zip(step.seqs, plan.seq_ids, plan.start_lengths,
                                                      plan.generations):
                if self._seqs.get(seq_id) is not seq or seq.generation != generation or seq.lengths[layer] != start:
                    raise PlanStale(f"sequence {seq_id} changed (or was freed) after its step was planned")
            if step.tables is not None:
                view = self._views[layer]
                append_rows_triton(view.k_seq, view.v_seq, view.k_dim, view.k_summary, k, v, step.tables[layer])
            else:
                self.pool.append_rows(layer, k, v, step.rows, step.targets)
                torch._foreach_add_([seq.value_sum[layer] for seq in step.seqs], list(v.float().unbind(0)))
            for seq in step.seqs:
                seq.lengths[layer] += 1
            step.written[layer] = True
            if self.summary_listeners:
                P = self.config.page_size
                starts = plan.start_lengths
                self._summaries_changed([layer], step.page_ids, torch.tensor([n // P for n in starts]),
                                        [n % P + 1 for n in starts])
            if all(step.written):
                for seq in step.seqs:
                    self._register(seq)

    def commit_rows(self, step: StepRows) -> None:
        """Record that every layer's new rows of a planned step were written on the device with step.tables (by a
        replayed CUDA graph, under the store's lock since plan_rows): lengths move on, full pages are hashed."""
        with self._lock:
            if any(step.written):
                raise PlanStale("layers of this step were written already")
            for seq in step.seqs:
                for layer in range(self.config.num_layers):
                    seq.lengths[layer] += 1
                self._register(seq)
            step.written = [True] * self.config.num_layers

    def lease_step(self, seq_ids: Sequence[str], seconds: float,
                   wait_writes: Callable[[], None] | None = None, steps: int = 1) -> StepLease:
        """Plan decode steps of `seq_ids` (plan_step, one new position a step) whose rows another process writes in
        the shared pool: its sequences refuse every other change until commit_lease, abort_lease, or `seconds` pass.
        The pages of `steps` new positions are made ready at once where the free list holds them, else of one
        (lease.steps says which). However the lease ends, `wait_writes` is called first (a GPU engine's writes ordered
        before the store's)."""
        if not seconds > 0:
            raise InvalidParameter(f"a step lease of {seconds!r} s: expected a positive number")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidParameter(f"a lease of {steps!r} steps: expected a positive number")
        with self._lock:
            plan = self.plan_step(seq_ids, 1, page_table=False)
            seqs = [self._seqs[s] for s in seq_ids]
            granted = 1
            if steps > 1 and sum(self._pages_needed(seq, steps, None) for seq in seqs) <= self.allocator.num_free:
                for seq, start in zip(seqs, plan.start_lengths):
                    self._prepare_pages(seq, start // self.config.page_size, self.config.pages_for(start + steps))
                granted = steps
            lease = StepLease(plan, seqs, time.monotonic() + seconds, wait_writes, granted)
            self.leases.add(lease)
            return lease

    def commit_lease(self, lease: StepLease, value_sums: torch.Tensor, steps: int = 1) -> None:
        """Record that every layer's new rows of the first `steps` steps of `lease` are in the pool and that
        value_sums [B, L, Hkv, d] (float32) are the sequences' value sums with them: lengths move on by `steps`, full
        pages are hashed, summary listeners are told, pages leased for later steps go back (0 steps: abort_lease);
        PlanStale if the lease ended first (aborted, or past its deadline: its rows are then not taken)."""
        with self._lock:
            if not self.leases.holds(lease) or lease.deadline < time.monotonic():
                self.abort_lease(lease)
                raise PlanStale(f"the lease of step {lease.step_id} ended before its commit: plan the step again")
            if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= lease.steps:
                self.abort_lease(lease)
                raise InvalidParameter(f"{steps!r} steps of a lease of {lease.steps} committed: aborted")
            if steps == 0:
                self.abort_lease(lease)
                return
            if lease.wait_writes is not None:
                lease.wait_writes()
            for b, seq in enumerate(lease.seqs):
                seq.value_sum.copy_(value_sums[b])
                seq.lengths = [n + steps for n in seq.lengths]
                self._register(seq)
            self.leases.drop(lease)
            self._end_lease(lease, steps)
            if self.summary_listeners:
                P, L = self.config.page_size, self.config.num_layers
                for seq, start in zip(lease.seqs, lease.plan.start_lengths):
                    end = start + steps
                    for index in range(start // P, self.config.pages_for(end)):
                        self._summaries_changed(list(range(L)), seq.pages[index : index + 1], index,
                                                [min(P, end - index * P)])

    def abort_lease(self, lease: StepLease) -> None:
        """End `lease` without its steps: the sequences keep their lengths, and the summaries of the pages their rows
        went to are recomputed over their committed rows (a layer the engine wrote folded its new row in)."""
        with self._lock:
            if not self.leases.holds(lease):
                return
            self.leases.drop(lease)
            if lease.wait_writes is not None:
                lease.wait_writes()
            self._end_lease(lease, 0)

    def _end_lease(self, lease: StepLease, steps: int) -> None:
        """After the first `steps` steps of `lease` were taken (or none): the page its next row went to gets summaries
        over its committed rows (an engine may have written some layers of that step), and pages beyond the
        sequences' lengths go back to the free list."""
        live = [(seq, n + steps) for seq, n in zip(lease.seqs, lease.plan.start_lengths)
                if self._seqs.get(seq.seq_id) is seq]
        if steps < lease.steps and live:
            rows = self._row_targets([seq for seq, _ in live], [n for _, n in live])
            dev, L, P = self.config.device, self.config.num_layers, self.config.page_size
            page_ids = torch.tensor([r[0] for r in rows], device=dev)
            kv_slots = torch.tensor([r[1] for r in rows], device=dev)
            fills = torch.tensor([n % P for _, n in live], device=dev).expand(L, -1)
            self.pool.refresh_summaries(torch.arange(L, device=dev), page_ids, kv_slots, fills)
        for seq, n in live:
            keep = self.config.pages_for(n)
            if seq.num_pages > keep:
                self._release(seq.pages[keep : seq.num_pages].clone())
                seq.num_pages = keep

    def end_overdue_leases(self) -> int:
        """Abort every step lease past its deadline (its engine died or hangs); returns how many."""
        with self._lock:
            overdue = self.leases.overdue()
            for lease in overdue:
                self.abort_lease(lease)
            return len(overdue)

    def reserve_scratch_page(self) -> int:
        """A page id no sequence will ever hold, for writes that must land somewhere harmless (a CUDA graph's warm-up
        runs its append kernel before any step has planned rows); taken from the pool for the store's life."""
        with self._lock:
            if self._scratch_page is None:
                [self._scratch_page] = self.allocator.allocate(1)
                if self.tiers is not None:
                    self.tiers.place_new([self._scratch_page], set())
            return self._scratch_page

    def check_plan(self, plan: StepPlan, seq_ids: Sequence[str], layer: int, appending: bool) -> None:
        """Raise PlanStale unless `plan` still describes `seq_ids` at `layer` for a call that appends (or not) its
        new positions: the same sequences, pages and lengths, none freed or forked since."""
        with self._lock:
            check_layers(self.config, layer)
            if tuple(seq_ids) != plan.seq_ids:
                raise PlanStale("the call names other sequences than its step's plan")
            if appending != bool(plan.new_tokens):
                raise PlanStale(f"the step was planned to append {plan.new_tokens} position(s) per layer call")
            done = 0 if appending else plan.new_tokens
            for seq_id, start, generation in zip(plan.seq_ids, plan.start_lengths, plan.generations):
                seq = self._seqs.get(seq_id)
                if seq is None:
                    raise PlanStale(f"sequence {seq_id} was freed after its step was planned")
                if seq.generation != generation or seq.lengths[layer] != start + done:
                    raise PlanStale(f"sequence {seq_id} changed after its step was planned (layer {layer} holds "
                                    f"{seq.lengths[layer]} positions, the plan expects {start + done})")

    def lengths(self, seq_ids: Sequence[str], layer: int) -> list[int]:
        """Cached positions of each sequence at `layer`."""
        with self._lock:
            check_layers(self.config, layer)
            return [self._get(s).lengths[layer] for s in seq_ids]

    # ---- what attention reads ----------------------------------------------------------------

    def layer_view(self, layer: int) -> LayerView:
        """Pool tensors of `layer`."""
        check_layers(self.config, layer)
        return self._views[layer]

    def page_table(self, seq_ids: Sequence[str], layer: int) -> PageTableCSR:
        """CSR page table of `seq_ids` for `layer` on the store's device."""
        with self._lock:
            check_layers(self.config, layer)
            return build_csr([self._get(s) for s in seq_ids], layer, self.config.device)

    def value_mean(self, seq_ids: Sequence[str], layer: int) -> torch.Tensor:
        """Mean of cached V per sequence and kv head [B, Hkv, d] float32, from the running sums."""
        with self._lock:
            check_layers(self.config, layer)
            seqs = [self._get(s) for s in seq_ids]
            # Divided by host-side counts in one launch: a count tensor would have to be sent to the device.
            means = torch._foreach_div([s.value_sum[layer] for s in seqs],
                                       [float(max(s.lengths[layer], 1)) for s in seqs])
            return torch.stack(means)

    def pool_usage(self) -> dict[str, int]:
        """Page counts: total, free (incl. evictable cached), cached, sequences; per tier when tiered."""
        with self._lock:
            a = self.allocator
            usage = {
                "pages_total": a.num_pages,
                "pages_free": a.num_free,
                "pages_cached": a.num_cached,
                "sequences": len(self._seqs),
                "sequences_expired": self.sequences_expired,
            }
            if self.config.disk_persistent:
                usage.update(pages_restored=self.pages_restored, pages_dropped_at_start=self.pages_dropped_at_start)
            if self.tiers is not None:
                usage.update(self.tiers.counts())
            return usage

    def bytes_moved(self) -> dict[str, int]:
        """Bytes moved between tiers so far, per direction (e.g. 'host<-device')."""
        if self.tiers is None:
            return {}
        return {k: int(v["bytes"]) for k, v in self.tiers.moved.snapshot().items()}

    def prefetch(self, seq_id: str, pages: Sequence[int] | None = None) -> SequenceInfo:
        """Bring a sequence's pages (indexes into its page table; all if None) to the device ahead of use."""
        with self._lock:
            seq = self._get(seq_id)
            if pages is None:
                wanted = seq.live_pages.tolist()
            else:
                idx = as_token_list(pages)
                if any(i >= seq.num_pages for i in idx):
                    raise PositionOutOfRange(f"sequence {seq_id}: page index beyond its {seq.num_pages} pages")
                wanted = seq.live_pages[idx].tolist() if idx else []
            if self.tiers is not None and wanted:
                self.tiers.bring_up(wanted, self.pinned_pages())
            return self._info(seq)

    def pinned_pages(self) -> set[int]:
        """Pages that stay on the device: the last `pinned_tail_pages` of every live sequence."""
        w = self.config.pinned_tail_pages
        pinned: set[int] = set()
        for seq in self._seqs.values():
            pinned.update(seq.pages[max(0, seq.num_pages - w) : seq.num_pages].tolist())
        return pinned

    def kv_slots(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Device slots of k_seq/v_seq for device-resident page ids (the ids themselves without tiers)."""
        return page_ids if self.tiers is None else self.tiers.device_slots(page_ids)

    @property
    def lock(self) -> threading.RLock:
        """The store's lock: held by readers that must see pages stay in their tiers."""
        return self._lock

    # ---- internals ---------------------------------------------------------------------------

    def _new_id(self) -> str:
        # Random, so one client cannot guess another's sequence (the service relies on this).
        return secrets.token_hex(16)

    def _get(self, seq_id: str) -> SequenceState:
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.lease_seconds is not None:  # any call naming the sequence renews its lease
            seq.lease_deadline = time.monotonic() + seq.lease_seconds
        if seq is None:
            shown = seq_id if len(str(seq_id)) <= 80 else f"{str(seq_id)[:64]}... ({len(str(seq_id))} characters)"
            raise SequenceNotFound(f"sequence {shown!r} unknown; was it freed?")
        return seq

    def _check_unleased(self, seq_id: str) -> None:
        """SequenceLeased if an engine's step lease holds `seq_id` (one past its deadline is aborted instead)."""
        lease = self.leases.of(seq_id)
        if lease is None:
            return
        if lease.deadline < time.monotonic():
            self.abort_lease(lease)
            return
        raise leased_error(seq_id, lease)

    def _owners_of(self, page: int) -> str:
        owners = [s.seq_id for s in self._seqs.values() if page in set(s.live_pages.tolist())]
        return "sequence " + ", ".join(owners) if owners else "no live sequence (prefix cache)"

    def _release(self, pages: torch.Tensor) -> None:
        freed = self.allocator.release(pages)
        if self.tiers is not None:
            self.tiers.drop(freed)

    def _plan_chunks(self, seq: SequenceState, start: int, num_new: int) -> list[tuple[int, int]]:
        """Offsets [s0, s1) of the device-side writes of a long append to a tiered store; raises StoreFull
        (before any change) if a chunk cannot fit beside the pinned tails.

        A chunk's new pages must fit on the device with the other sequences' pinned tails and this
        sequence's own tail as it stands before the chunk. Pages this sequence shares with another
        (a fork) count in both, which leaves room for their copy on write."""
        P, W = self.config.page_size, self.config.pinned_tail_pages
        others = 0
        for other in self._seqs.values():
            if other is not seq:
                others += min(W, other.num_pages)
        chunks: list[tuple[int, int]] = []
        done, pages = 0, seq.num_pages
        while done < num_new:
            position = start + done
            room = self.config.device_pages - others - min(W, pages)
            cap = max(room, 0) * P + (P - position % P) % P  # new pages, plus what is left of the last one
            if cap <= 0:
                raise StoreFull(f"the device holds {self.config.device_pages} pages: {others} are pinned by other "
                                f"sequences and {min(W, pages)} by this one's tail; no room for a new page")
            n = min(cap, num_new - done)
            chunks.append((done, done + n))
            done += n
            pages = max(pages, self.config.pages_for(start + done))
        return chunks

    def _register(self, seq: SequenceState) -> None:
        """Hash the sequence's newly full pages into the prefix cache; those already on a persistent disk tier (they
        went down before they were full) are recorded there now."""
        hashed = register_full_pages(self.allocator, seq, self.config.page_size)
        if self.tiers is not None and hashed:
            self.tiers.record_prefix(hashed)

    def _info(self, seq: SequenceState) -> SequenceInfo:
        return SequenceInfo(seq.seq_id, tuple(seq.lengths), seq.num_pages, seq.cached_tokens)

    def _row_targets(self, seqs: list[SequenceState], positions: Sequence[int]) -> list[tuple[int, int, int]]:
        """(page id, device slot, row in the page) of position positions[b] of each of `seqs` (its page ready)."""
        P = self.config.page_size
        rows = []
        for seq, position in zip(seqs, positions):
            page = int(seq.pages.numpy()[position // P])
            rows.append((page, page if self.tiers is None else int(self.tiers.slot[page]), position % P))
        return rows

    def _append_columns(self, layer: int, seqs: list[SequenceState], rows: list[tuple[int, int, int]]) -> list[int]:
        """append_rows_triton's table [4, B] at `layer`, flattened: pages, slots, rows, and the address of each
        sequence's float32 value sum of that layer (value_sum [L, Hkv, d] is contiguous)."""
        layer_bytes = layer * self.config.num_kv_heads * self.config.head_dim * SUMMARY_DTYPE.itemsize
        return [x for column in zip(*rows) for x in column] + [seq.value_sum.data_ptr() + layer_bytes for seq in seqs]

    def _write_decode_rows(self, layer: int, seqs: list[SequenceState], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, Hkv, d] (on the device) at the next position of each of `seqs` at `layer`, whose
        pages are ready: both key layouts, the page summaries and the value sums, in a few launches for
        the whole batch (kvcache.kernels.append_rows on CUDA)."""
        P = self.config.page_size
        rows = self._row_targets(seqs, [seq.lengths[layer] for seq in seqs])
        if self.config.device.type == "cuda" and self.triton_append:
            view = self._views[layer]
            table = ints_to_device(self._append_columns(layer, seqs, rows), self.config.device)
            append_rows_triton(view.k_seq, view.v_seq, view.k_dim, view.k_summary, k, v, table.view(4, -1))
        else:
            self.pool.append_rows(layer, k, v, rows)
            torch._foreach_add_([seq.value_sum[layer] for seq in seqs], list(v.float().unbind(0)))
        if self.summary_listeners:
            for seq in seqs:
                position = seq.lengths[layer]  # of the row just written: the length moves on after this
                index = position // P
                self._summaries_changed([layer], seq.pages[index : index + 1], index, [position % P + 1])

    def _append_rows(self, seq: SequenceState, layers: list[int], start: int, end: int, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Positions [start, end) of `layers` (k, v [nl, T, Hkv, d]) in one vectorised pass."""
        P = self.config.page_size
        dev = self.config.device
        positions = torch.arange(start, end)
        page_ids = seq.pages[positions // P].to(dev, torch.long)
        slots = (positions % P).to(dev)
        layers_t = torch.tensor(layers, device=dev)
        self.pool.write(layers_t, page_ids, self.kv_slots(page_ids), slots, k, v)
        first_page, end_page = start // P, self.config.pages_for(end)
        touched = seq.pages[first_page:end_page].to(dev, torch.long)
        fills = (end - torch.arange(first_page, end_page) * P).clamp(max=P)
        self.pool.refresh_summaries(layers_t, touched, self.kv_slots(touched), fills.to(dev).expand(len(layers), -1))
        self._summaries_changed(layers, seq.pages[first_page:end_page], first_page, fills.tolist())
        if self.tiers is not None:
            self.tiers.policy.touch(seq.pages[first_page:end_page].tolist())
        seq.value_sum[layers_t] += v.float().sum(dim=1)

    def _page_ready(self, seq: SequenceState, index: int) -> bool:
        """Whether the sequence's page `index` exists, is its alone and is on the device: the usual decode step,
        which then needs no page. Read through numpy views: a torch scalar read costs microseconds."""
        if index >= seq.num_pages:
            return False
        page = seq.pages.numpy()[index]
        return self._refcounts[page] <= 1 and (self.tiers is None or int(self.tiers.tier[page]) == DEVICE)

    def _pages_needed(self, seq: SequenceState, num_new_positions: int, layer: int | None) -> int:
        """Pages an append of `num_new_positions` would take from the free list (new + copy-on-write)."""
        start = seq.lengths[0 if layer is None else layer]
        first_page, end_page = start // self.config.page_size, self.config.pages_for(start + num_new_positions)
        if end_page - first_page == 1 and self._page_ready(seq, first_page):
            return 0
        existing = seq.live_pages[first_page:end_page]
        shared = int((self.allocator.refcount[existing.long()] > 1).sum())
        return shared + max(0, end_page - seq.num_pages)

    def _prepare_pages(self, seq: SequenceState, first_page: int, end_page: int) -> None:
        """Give the sequence private pages [first_page, end_page): copy shared ones, allocate new ones."""
        if end_page - first_page == 1 and self._page_ready(seq, first_page):
            return
        existing = seq.live_pages[first_page:end_page]
        shared_mask = self.allocator.refcount[existing.long()] > 1
        num_new = max(0, end_page - seq.num_pages)
        num_shared = int(shared_mask.sum())
        if num_new + num_shared == 0:  # the common decode step: the last page has room and is private
            if self.tiers is not None:  # a layer behind the others may write to pages that went down
                pages = existing.tolist()
                if any(int(self.tiers.tier[p]) != DEVICE for p in pages):  # rare: keeps the decode step cheap
                    self.tiers.bring_up(pages, self.pinned_pages() | set(pages))
            return
        idx = torch.nonzero(shared_mask).flatten() + first_page
        if self.tiers is not None:
            pinned = self.pinned_pages() | set(existing.tolist())
            below = sum(int(self.tiers.tier[p]) != DEVICE for p in existing.tolist())
            self.tiers.room_check(num_shared + num_new + below, pinned)  # before any change
        fresh = self.allocator.allocate(num_shared + num_new)  # raises before any change
        if self.tiers is not None:
            try:
                self.tiers.bring_up(existing.tolist(), pinned | set(fresh))
                self.tiers.place_new(fresh, pinned | set(existing.tolist()))
            except BaseException:  # a corrupted page met on the way down: give the fresh ids back
                self._release(torch.tensor(fresh, dtype=torch.int32))
                raise
        if num_shared:
            src = seq.pages[idx].clone()
            dst = torch.tensor(fresh[: len(idx)], dtype=torch.int32)
            dev = self.config.device
            src_d, dst_d = src.to(dev, torch.long), dst.to(dev, torch.long)
            self.pool.copy_pages(src_d, dst_d, self.kv_slots(src_d), self.kv_slots(dst_d))
            seq.pages[idx] = dst
            seq.generation += 1
            # The copies carry every layer's summaries, also of layers this append does not write; layers appended
            # one at a time may hold different lengths (a step part way through its layers).
            for length in sorted(set(seq.lengths)):
                layers = [layer for layer, n in enumerate(seq.lengths) if n == length]
                held = (length - idx * self.config.page_size).clamp(1, self.config.page_size)
                self._summaries_changed(layers, dst, idx, held.tolist())
            self._release(src)
        if num_new:
            seq.push_pages(fresh[len(fresh) - num_new :])

    def _reuse_prefix(self, seq: SequenceState) -> None:
        """Take cached pages for the leading full pages of seq.token_ids (at least one token is left to compute)."""
        P = self.config.page_size
        pages, digest = acquire_prefix(self.allocator, seq.token_ids, seq.last_hash, P)
        if not pages:
            return
        seq.push_pages(pages)
        seq.num_hashed_pages = len(pages)
        seq.last_hash = digest
        seq.cached_tokens = len(pages) * P
        seq.lengths = [seq.cached_tokens] * self.config.num_layers
        # A reused prefix was never appended here, so its value sums are taken once from its pages.
        if self.tiers is None:
            idx = torch.tensor(pages, device=self.config.device)
            values = self.pool.v_seq[:, idx].float()  # [L, n, Hkv, P, d]
        else:
            values = torch.stack([self.tiers.page_kv(p)[:, 1] for p in pages], dim=1).float()
        seq.value_sum += values.sum(dim=(1, 3)).to(seq.value_sum.device)
        self._summaries_changed(list(range(self.config.num_layers)), seq.live_pages, 0, [P] * len(pages))

    def _summaries_changed(self, layers: list[int], page_ids: torch.Tensor, at: int | torch.Tensor,
                           fills: list[int]) -> None:
        """Tell the listeners that pages page_ids (CPU int32) changed summaries; they sit at page indexes
        `at` (a CPU tensor), or at..at+n-1 (an int), and hold their first fills[i] rows."""
        if not self.summary_listeners:
            return
        indexes = torch.arange(at, at + len(page_ids)) if isinstance(at, int) else at.long()
        for listener in self.summary_listeners:
            listener(layers, page_ids.long(), indexes, fills)

    def page_keys(self, layer: int, page_ids: torch.Tensor) -> torch.Tensor:
        """Keys of pages page_ids [n] at `layer` as stored, [n, Hkv, P, d] on the device, from whichever tier holds
        each page (rows past a page's fill are whatever the slot held)."""
        return page_keys(self, layer, page_ids)

    def read_positions(self, seq_id: str, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows [Hkv, n, d] of a sequence at positions [Hkv, n] (each below its length), from whichever tier
        holds them."""
        with self._lock:  # the page table and the tiers must agree while the rows are read
            csr = self.page_table([seq_id], layer)
            return read_positions(self, layer, csr, 0, positions.to(self.config.device), Moves(self.tiers))
