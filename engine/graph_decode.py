"""GraphDecoder: the engine's whole decode step captured as one CUDA graph and replayed, on an in-process CUDA store
(docs/architecture.md, "Decode steps as CUDA graphs").

Eager, a step of SmolLM2-135M launches hundreds of small kernels from Python (26.8 ms at 4K on an H100); replayed,
1.39 ms, as fast as the same model over a static cache replayed as a graph (bench/results/e2e_fused_smollm2_h100.json).
`kvcache generate --device cuda` replays graphs unless told `--no-cuda-graph`. Captured, the
embedding, every layer's projections, the append of the new K/V rows into the paged store (both key layouts, the
summaries and the value sums), the paged attention and the head replay as one launch. Everything a step changes
is written into the graph's static buffers before the replay, outside it:

- the token ids and positions;
- the batch's page table (indptr, page ids, last-page fills), padded to the graph's capacity in positions;
- where each sequence's new row goes in every layer (KVStore.plan_rows' tables);
- the sequences' value sums and new lengths, from which SparQ's mean value is computed in the graph;
- the page index and fill of each sequence's last page, from which a page gate's key of that page is recomputed
  in the graph (GateKeyCache.update_step), whatever the step's method, so the gate's keys stay current.

A graph is captured per (batch size, capacity, method, parameters), the capacity a power of two of positions per
sequence: the kernels' buffers and splits are sized by it, and each program reads the actual lengths from the page
table. A longer sequence, another batch size or method captures another graph (outside any replay), at the first
step that needs it: the warm-up runs before the capture read that step's pages and write their rows into a scratch
page. The store's own bookkeeping (lengths, prefix-cache hashing) is done by KVStore.commit_rows after each replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvcache.clients.inprocess import InProcessClient
from kvcache.engine.model import Llama
from kvcache.errors import PlanStale
from kvcache.kernels.append_rows import append_rows_triton
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_DENSE, attend_partial, merge_partials, plan_splits
from kvcache.kernels.tuning import TUNING
from kvcache.methods.base import AttentionMethod, Params
from kvcache.methods.byte_budget import BYTES
from kvcache.methods.gate_store import attached_gate_keys
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.registry import lookup
from kvcache.methods.selection_attention import attend_triton
from kvcache.store.host_copy import ints_to_device
from kvcache.store.step_plan import StepRows

if TYPE_CHECKING:  # grpc is imported only where a remote client is made
    from kvcache.clients.pool_plane import PoolPlane
    from kvcache.clients.remote import RemoteClient

MIN_CAPACITY = 1024  # positions per sequence of the smallest graph
# Methods whose selection on the GPU reads lengths from the page table on the device and needs nothing of the host
# per layer (the oracle, an evaluation bound, reads true attention scores on the host).
GRAPH_METHODS = ("dense", "sparq", "quest", "window", "gate")


def replayable(method: str, params: Mapping[str, Any] | None) -> str | None:
    """Why a step by `method` with `params` is not replayed from a graph (None: it is): a byte budget gives each
    layer parameters of its own, and min_coverage reads each layer's estimate back on the host."""
    if method not in GRAPH_METHODS:
        return f"method {method!r} is not replayed from graphs; these are: {GRAPH_METHODS}"
    if BYTES in (params or {}):
        return "a byte budget gives every layer parameters of its own"
    if (params or {}).get("min_coverage") is not None:
        return "min_coverage reads every layer's coverage back on the host"
    return None


def graph_unsupported(client: object, model: Llama) -> str | None:
    """Why the decode step of `model` over `client` cannot be captured, or None if it can."""
    store = getattr(client, "store", None)
    if store is None:
        return "the KV store is not in this process (a remote or sharded client)"
    c = store.config
    if c.device.type != "cuda" or model.device.type != "cuda":
        return "the store and the model must be on a CUDA device"
    if store.tiers is not None:
        return "a tiered store moves pages between steps"
    if not store.triton_append:
        return f"head_dim {c.head_dim} is not a power of two"
    gate_keys = attached_gate_keys(store)
    if any(gate_keys is None or listener != gate_keys.update for listener in store.summary_listeners):
        return "a listener of page summary changes other than the page gate's is attached"
    return None


class _Graph:
    """One step for `batch` sequences of up to `capacity` positions by method `m`: static buffers, then the graph
    captured at the first step that loads them."""

    def __init__(self, model: Llama, client: InProcessClient, batch: int, capacity: int, m: AttentionMethod,
                 p: Params) -> None:
        store = client.store
        c = store.config
        dev = c.device
        self.store, self.model = store, model
        self.batch, self.capacity = batch, capacity
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        max_pages = c.pages_for(capacity)
        self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(batch * max_pages, dtype=torch.int32, device=dev)
        self.last_len = torch.ones(batch, dtype=torch.int32, device=dev)
        self.tables = torch.zeros((c.num_layers, 4, batch), dtype=torch.int64, device=dev)
        self.page_index = torch.zeros(batch, dtype=torch.int64, device=dev)  # of each sequence's last page
        self.fills = torch.ones(batch, dtype=torch.int64, device=dev)  # rows that page holds after the step
        gate_keys = self.gate_keys = attached_gate_keys(store)
        self.sums = torch.zeros((batch, c.num_layers, c.num_kv_heads, c.head_dim), dtype=torch.float32, device=dev)
        self.lengths = torch.ones(batch, dtype=torch.float32, device=dev)
        self.csr = PageTableCSR(self.indptr, self.indices, self.last_len, c.page_size, (capacity,) * batch)
        self.graph: torch.cuda.CUDAGraph | None = None
        launch = TUNING["decode"]
        num_splits, _ = plan_splits(capacity, batch * c.num_kv_heads, launch.block_n, launch.programs)
        views = [store.layer_view(layer) for layer in range(c.num_layers)]
        dtype = c.dtype

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            view = views[layer]
            new_v = v[:, 0].to(dtype).contiguous()
            append_rows_triton(view.k_seq, view.v_seq, view.k_dim, view.k_summary, k[:, 0].to(dtype).contiguous(),
                               new_v, self.tables[layer])
            if gate_keys is not None:
                gate_keys.update_step(layer, view.k_seq, self.tables[layer, 0], self.page_index, self.fills)
            qs = q[:, 0].to(dtype).contiguous()
            if m.name == "dense":
                parts = attend_partial(qs, view.k_seq, view.v_seq, self.csr, capacity, MODE_DENSE,
                                       num_splits=num_splits)
                out, _ = merge_partials(qs, parts, c.num_kv_heads)
            else:
                inputs = LayerInputs(store, [], layer, self.csr)
                # The value sums loaded before the step, plus the row just appended, over the new lengths.
                inputs.__dict__["value_mean"] = (self.sums[:, layer] + new_v.float()) / self.lengths[:, None, None]
                out, _ = attend_triton(qs, inputs, m.select_gpu(qs, inputs, p), p.scale)
            return out[:, None].to(q.dtype)

        self._step = lambda: model(self.ids, self.positions, attend, last_only=True)[:, 0]

    def load(self, token_ids: Sequence[int] | torch.Tensor, positions: Sequence[int], rows: StepRows) -> None:
        """Write one step's inputs into the static buffers: copies queued on the stream, none waited for, so the
        host plans the next step while the GPU replays this one. token_ids may be a device tensor [B] (the
        previous step's `greedy`), which then never visits the host."""
        csr = rows.plan.csr
        B, P = self.batch, self.store.config.page_size
        starts = rows.plan.start_lengths
        ints = [*positions, *(n + 1 for n in starts), *(n // P for n in starts), *(n % P + 1 for n in starts)]
        if isinstance(token_ids, torch.Tensor):
            host = ints_to_device(ints, self.ids.device)
            self.ids.copy_(token_ids.view(B, 1))
        else:
            host = ints_to_device([*ints, *token_ids], self.ids.device)
            self.ids.copy_(host[4 * B :].view(B, 1))
        self.positions.copy_(host[:B].view(B, 1))
        self.lengths.copy_(host[B : 2 * B])
        self.page_index.copy_(host[2 * B : 3 * B])
        self.fills.copy_(host[3 * B : 4 * B])
        self.indptr.copy_(csr.indptr)
        self.indices[: csr.indices.numel()].copy_(csr.indices)
        self.last_len.copy_(csr.last_page_len)
        self.tables.copy_(rows.tables)
        torch.stack([seq.value_sum for seq in rows.seqs], out=self.sums)

    def capture(self) -> None:
        """Warm up (Triton compiles, cuBLAS picks its kernels) and capture, over the loaded step's pages, with the
        new rows written into a scratch page: the real tables are put back for the replay."""
        real = self.tables.clone()
        scratch = torch.zeros_like(self.sums[0, 0])
        page = self.store.reserve_scratch_page()
        self.tables[:, 0] = page
        self.tables[:, 1] = page
        self.tables[:, 2] = 0
        self.tables[:, 3] = scratch.data_ptr()
        dev = self.ids.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
            self.greedy = self.logits.argmax(dim=-1)
        torch.cuda.current_stream(dev).synchronize()  # the scratch row is written before its buffer goes
        self.tables.copy_(real)


class GraphDecoder:
    """Decode steps of `model` over an in-process CUDA store, each replayed from a captured graph."""

    def __init__(self, model: Llama, client: InProcessClient) -> None:
        why = graph_unsupported(client, model)
        if why is not None:
            raise ValueError(f"a decode step cannot be captured as a CUDA graph: {why}")
        self.model = model.for_decoding()
        self.client = client
        self._graphs: dict[tuple, _Graph] = {}
        self.captures = 0
        # The last step's argmax tokens [B] (int64, on the device): the next step's input in a greedy loop.
        self.greedy: torch.Tensor | None = None

    def _graph(self, batch: int, longest: int, m: AttentionMethod, p: Params) -> _Graph:
        capacity = max(MIN_CAPACITY, 1 << (longest - 1).bit_length())
        # A gate attached (or replaced) since a capture changes what the graph must update: another key.
        key = (batch, capacity, m.name, tuple(sorted(p.as_dict().items())), id(attached_gate_keys(self.client.store)))
        if key not in self._graphs:
            # A longer capacity replaces the shorter ones of the same batch and method: their memory comes back.
            for old in [k for k in self._graphs if k[0] == batch and k[2:] == key[2:]]:
                del self._graphs[old]
            self._graphs[key] = _Graph(self.model, self.client, batch, capacity, m, p)
        return self._graphs[key]

    def step(self, seq_ids: Sequence[str], token_ids: Sequence[int] | torch.Tensor, positions: Sequence[int],
             method: str = "dense", params: Mapping[str, Any] | None = None,
             before_replay: Callable[[], None] | None = None) -> tuple[torch.Tensor, int]:
        """Feed token_ids[b] at positions[b] to seq_ids[b] (holding positions[b] entries), attending by `method`
        (as `replayable` allows): logits [B, vocab] float32 (a copy) and the attention bytes the step read.
        `before_replay` runs after any capture, just before the replay writes the step's rows (it may raise).

        Nothing here waits for the GPU: the step is queued and the host returns. token_ids may be the previous
        step's `greedy` (a device tensor), so that a greedy loop reads tokens back only when it wants them."""
        why = replayable(method, params)
        if why is not None:
            raise ValueError(f"this step is not replayed from a graph: {why}")
        store = self.client.store
        c = store.config
        m = lookup(method)
        p = m.parse(params)
        with store.lock:
            lengths = [n + 1 for n in store.lengths(seq_ids, 0)]
            m.check(c, lengths, p)  # before any page is taken: SparQ's k, say, must fit every sequence
            rows = store.plan_rows(seq_ids)
            if list(rows.plan.start_lengths) != [int(x) for x in positions]:
                raise ValueError(f"positions {list(positions)} differ from the sequences' lengths "
                                 f"{list(rows.plan.start_lengths)}")
            graph = self._graph(len(seq_ids), max(lengths), m, p)
            graph.load(token_ids, positions, rows)
            if graph.graph is None:
                graph.capture()
                self.captures += 1
            if before_replay is not None:
                before_replay()
            graph.graph.replay()
            logits = graph.logits.clone()
            self.greedy = graph.greedy.clone()
            store.commit_rows(rows)
        nbytes = m.bytes_read(c, lengths, p) * c.num_layers
        self.client.counters.add(method, calls=c.num_layers, bytes_read=nbytes)
        return logits, nbytes


class LeasedGraphDecoder:
    """GraphDecoder's steps over a server's shared GPU pool (kvcache serve --share-pool): leased from the server
    `steps_per_lease` steps at a time, replayed in this process on the mapped pool, and committed; the server keeps
    every page's bookkeeping.

    With `commit_with_next` a lease's steps are committed by the next lease request: one socket round trip per lease,
    the sequences held by the engine until then (a change its own client makes, or end_step(), commits first; another
    client's change waits for that, or for the lease's end). Without it each step is leased and committed alone."""

    def __init__(self, model: Llama, client: RemoteClient, commit_with_next: bool = True,
                 steps_per_lease: int = 16) -> None:
        if steps_per_lease < 1:
            raise ValueError(f"steps_per_lease={steps_per_lease} must be at least 1")
        self.model, self.client = model, client
        self.commit_with_next = commit_with_next
        self.steps_per_lease = steps_per_lease if commit_with_next else 1
        self.plane = self._plane()
        self.decoder = GraphDecoder(model, self.plane.client)

    def _plane(self) -> PoolPlane:
        plane = self.client.pool_plane()
        if plane is None:
            raise ValueError("the server shares no page pool that this process can map (kvcache serve --share-pool)")
        return plane

    @property
    def greedy(self) -> torch.Tensor | None:
        """The last step's argmax tokens [B] on the device (GraphDecoder.greedy)."""
        return self.decoder.greedy

    def step(self, seq_ids: Sequence[str], token_ids: Sequence[int] | torch.Tensor, positions: Sequence[int],
             method: str = "dense", params: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, int]:
        """GraphDecoder.step of a leased step: logits [B, vocab] float32 and the attention bytes read."""
        plane = self._plane()
        if plane is not self.plane:  # the connection was lost and opened again: another mapping of the pool
            self.plane, self.decoder = plane, GraphDecoder(self.model, plane.client)
        for attempt in (1, 2):
            if not (plane.store.can_step(seq_ids) and time.monotonic() < plane.deadline):
                plane.lease(seq_ids, self.steps_per_lease)

            def in_time(deadline: float = plane.deadline) -> None:
                if time.monotonic() > deadline:
                    raise PlanStale("the step's lease ran out before its replay")

            try:
                result = self.decoder.step(seq_ids, token_ids, positions, method, params, before_replay=in_time)
            except PlanStale:
                plane.flush()  # the lease's steps written so far are committed, the rest given back
                if attempt == 2:
                    raise  # its graph was captured under the first lease: the second ran out on a replay alone
                continue
            except BaseException:
                plane.flush()
                raise
            if not self.commit_with_next:
                plane.flush()  # committed: the replay's rows are recorded
            return result
        raise AssertionError("unreachable")

    def end_step(self) -> None:
        """Commit the last step now rather than with the next one."""
        self.plane.flush()
