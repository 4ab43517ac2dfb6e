"""GraphDecoder: the engine's whole dense decode step captured as one CUDA graph and replayed, on an in-process CUDA
store (docs/architecture.md, "Decode steps as CUDA graphs").

Eager, a step of SmolLM2-135M launches hundreds of small kernels from Python (47.8 ms at 4K on an H100 where the
same model over a static cache replayed as a graph takes 3.3 ms: bench/results/e2e_h100.json). Captured, the
embedding, every layer's projections, the append of the new K/V rows into the paged store (both key layouts, the
summaries and the value sums), the paged attention and the head replay as one launch. Everything a step changes
is written into the graph's static buffers before the replay, outside it:

- the token ids and positions;
- the batch's page table (indptr, page ids, last-page fills), padded to the graph's capacity in positions;
- where each sequence's new row goes in every layer (KVStore.plan_rows' tables).

A graph is captured per (batch size, capacity), the capacity a power of two of positions per sequence: the
attention kernel's split of the positions is fixed by it, and each program reads the actual lengths from the page
table. A longer sequence, or another batch size, captures another graph (outside any replay); the store's own
bookkeeping (lengths, prefix-cache hashing) is done by KVStore.commit_rows after each replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcache.clients.inprocess import InProcessClient
from kvcache.engine.model import Llama
from kvcache.kernels.append_rows import append_rows_triton
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.paged_decode import MODE_DENSE, attend_partial, merge_partials, plan_splits
from kvcache.kernels.tuning import TUNING
from kvcache.methods.dense import DENSE

MIN_CAPACITY = 1024  # positions per sequence of the smallest graph


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
    if store.summary_listeners:
        return "a page gate is attached (its keys are updated on the host)"
    return None


class _Graph:
    """One captured step for `batch` sequences of up to `capacity` positions, and its static buffers."""

    def __init__(self, model: Llama, client: InProcessClient, batch: int, capacity: int) -> None:
        store = client.store
        c = store.config
        dev = c.device
        self.batch, self.capacity = batch, capacity
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        max_pages = c.pages_for(capacity)
        self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(batch * max_pages, dtype=torch.int32, device=dev)
        self.last_len = torch.ones(batch, dtype=torch.int32, device=dev)
        self.tables = torch.zeros((c.num_layers, 4, batch), dtype=torch.int64, device=dev)
        self.csr = PageTableCSR(self.indptr, self.indices, self.last_len, c.page_size, (capacity,) * batch)
        launch = TUNING["decode"]
        self.num_splits, _ = plan_splits(capacity, batch * c.num_kv_heads, launch.block_n, launch.programs)
        views = [store.layer_view(layer) for layer in range(c.num_layers)]
        dtype = c.dtype

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            view = views[layer]
            append_rows_triton(view.k_seq, view.v_seq, view.k_dim, view.k_summary, k[:, 0].to(dtype).contiguous(),
                               v[:, 0].to(dtype).contiguous(), self.tables[layer])
            qs = q[:, 0].to(dtype).contiguous()
            parts = attend_partial(qs, view.k_seq, view.v_seq, self.csr, capacity, MODE_DENSE,
                                   num_splits=self.num_splits)
            out, _ = merge_partials(qs, parts, c.num_kv_heads)
            return out[:, None].to(q.dtype)

        def step() -> torch.Tensor:
            return model(self.ids, self.positions, attend, last_only=True)[:, 0]

        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture. The warm-up writes
        # rows at whatever the tables say: they are zero, page 0 row 0 of a value sum at address 0 would fault, so
        # the tables point at a scratch row first.
        self._scratch = torch.zeros((c.num_kv_heads, c.head_dim), dtype=torch.float32, device=dev)
        self.tables.zero_()
        self.tables[:, 3] = self._scratch.data_ptr()
        self._scratch_page = store.reserve_scratch_page()
        self.tables[:, 0] = self._scratch_page
        self.tables[:, 1] = self._scratch_page
        self.indptr.copy_(torch.arange(batch + 1, dtype=torch.int32, device=dev))
        self.indices[:batch] = self._scratch_page
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def load(self, token_ids: Sequence[int], positions: Sequence[int], csr: PageTableCSR,
             tables: torch.Tensor) -> None:
        """Write one step's inputs into the static buffers (host-to-device copies, no sync)."""
        dev = self.ids.device
        self.ids.copy_(torch.tensor(token_ids, dtype=torch.long).view(-1, 1), non_blocking=True)
        self.positions.copy_(torch.tensor(positions, dtype=torch.long).view(-1, 1), non_blocking=True)
        self.indptr.copy_(csr.indptr)
        self.indices[: csr.indices.numel()].copy_(csr.indices)
        self.last_len.copy_(csr.last_page_len)
        self.tables.copy_(tables.to(dev))


class GraphDecoder:
    """Dense decode steps of `model` over an in-process CUDA store, each replayed from a captured graph."""

    def __init__(self, model: Llama, client: InProcessClient) -> None:
        why = graph_unsupported(client, model)
        if why is not None:
            raise ValueError(f"a decode step cannot be captured as a CUDA graph: {why}")
        self.model = model
        self.client = client
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.captures = 0

    def _graph(self, batch: int, longest: int) -> _Graph:
        capacity = max(MIN_CAPACITY, 1 << (longest - 1).bit_length())
        key = (batch, capacity)
        if key not in self._graphs:
            # A longer capacity replaces the shorter one of the same batch size: its memory comes back.
            for old in [k for k in self._graphs if k[0] == batch]:
                del self._graphs[old]
            self._graphs[key] = _Graph(self.model, self.client, batch, capacity)
            self.captures += 1
        return self._graphs[key]

    def step(self, seq_ids: Sequence[str], token_ids: Sequence[int], positions: Sequence[int]) -> tuple[
            torch.Tensor, int]:
        """Feed token_ids[b] at positions[b] to seq_ids[b] (holding positions[b] entries): logits [B, vocab]
        float32 (a copy) and the attention bytes the step read."""
        store = self.client.store
        with store.lock:
            rows = store.plan_rows(seq_ids)
            lengths = [n + 1 for n in rows.plan.start_lengths]
            if list(rows.plan.start_lengths) != [int(p) for p in positions]:
                raise ValueError(f"positions {list(positions)} differ from the sequences' lengths "
                                 f"{list(rows.plan.start_lengths)}")
            graph = self._graph(len(seq_ids), max(lengths))
            graph.load(token_ids, positions, rows.plan.csr, rows.tables)
            graph.graph.replay()
            logits = graph.logits.clone()
            store.commit_rows(rows)
        c = store.config
        nbytes = DENSE.bytes_read(c, lengths, DENSE.parse({})) * c.num_layers
        self.client.counters.add("dense", calls=c.num_layers, bytes_read=nbytes)
        return logits, nbytes
