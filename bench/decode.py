"""Decode attention benchmark: time, bytes read and bandwidth per method against SDPA on contiguous K/V.

`kvcache bench decode` on a GPU times the Triton kernels (CUDA events, CUDA graphs, L2 flushed,
median); on a CPU it runs the torch references at small sizes so the bytes per token show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcache.bench.timing import Timer, run_header
from kvcache.config import KVCacheConfig
from kvcache.methods import METHODS
from kvcache.methods.attend import attend
from kvcache.methods.dense import dense_bytes
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.selection_attention import attend_triton
from kvcache.methods.sparq import sparq_bytes
from kvcache.store import KVStore

LLAMA3_ROPE_BASE = 500000.0  # the gate is pre-RoPE, as `kvcache train-gate` makes it: q rotated back in the step


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: batch, context, heads, head dim, dtype, page size."""

    batch: int
    context: int
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    page_size: int = 16


def build_store(shape: Shape, device: torch.device, seed: int = 0) -> tuple[KVStore, list[str]]:
    """A store holding `batch` sequences of `context` random positions, appended in interleaved chunks."""
    pages = shape.batch * -(-shape.context // shape.page_size) + 1
    config = KVCacheConfig(
        num_layers=1, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, page_size=shape.page_size,
        dtype=shape.dtype, device=device, device_pages=pages,
    )
    store = KVStore(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    seqs = [store.create().seq_id for _ in range(shape.batch)]
    chunk = 16384
    for start in range(0, shape.context, chunk):
        n = min(chunk, shape.context - start)
        for seq in seqs:  # interleaved, so each sequence's pages are scattered through the pool
            kv = torch.randn((2, n, shape.num_kv_heads, shape.head_dim), generator=gen, device=device)
            store.append(seq, kv[0].to(shape.dtype), kv[1].to(shape.dtype), layer=0)
    return store, seqs


def method_grid(context: int, methods: list[str], page_size: int) -> list[tuple[str, dict]]:
    """The (method, params) rows of one context: dense, SparQ at r in {16, 32} x k in {S/16, S/8}, Quest at S/16 and
    S/8, the gate at a 4096-token budget and S/16, the window at S/16 and S/8 rows."""
    rows: list[tuple[str, dict]] = []
    if "dense" in methods:
        rows.append(("dense", {}))
    if "sparq" in methods:
        for r in (16, 32):
            for div in (16, 8):
                k = context // div
                rows.append(("sparq", {"r": r, "k": k, "local_window": k // 4}))
    if "quest" in methods:
        for div in (16, 8):
            rows.append(("quest", {"top_pages": max(1, context // div // page_size)}))
    if "gate" in methods:  # SeerAttention's decode budget (2-4K tokens, docs/sparse-attention.md §3) and S/16
        for budget in dict.fromkeys((4096, context // 16)):
            rows.append(("gate", {"budget": min(budget, context)}))
    if "window" in methods:  # 4 sinks and a window: S/16 and S/8 rows, SparQ's k
        for div in (16, 8):
            rows.append(("window", {"window": max(1, context // div - 4)}))
    return rows


def run(
    contexts: list[int], batches: list[int], methods: list[str], device: torch.device, iters: int = 30,
    max_tokens: int = 2**20, page_size: int = 16,
) -> dict:
    """Benchmark every (batch, context) within `max_tokens` cached positions; returns the JSON-ready report."""
    timer = Timer(device, iters=iters)
    eager = Timer(device, iters=iters, use_graphs=False)
    copy_bw = timer.copy_bandwidth()
    report: dict = {
        **run_header(device),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "page_size": page_size,
        "rows": [],
    }
    print(f"device: {report['device']}  copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    print(f"{'B':>2} {'context':>8} {'method':<7} {'params':<28} {'time us':>9} {'MB read':>9} "
          f"{'GB/s':>7} {'of copy':>7} {'vs SDPA':>8} {'eager us':>9}")
    for batch in batches:
        for context in contexts:
            if batch * context > max_tokens:
                continue
            shape = Shape(batch, context, page_size=page_size)
            store, seqs = build_store(shape, device)
            if "gate" in methods:  # random weights: the gate's cost does not depend on what it learned
                from kvcache.methods.gate_model import GateShape, PageGate
                from kvcache.methods.gate_store import attach_gate

                attach_gate(store, PageGate(GateShape(1, shape.num_kv_heads, shape.num_q_heads // shape.num_kv_heads,
                                                      shape.head_dim, shape.page_size,
                                                      model_rope_base=LLAMA3_ROPE_BASE)))
            q = torch.randn((batch, shape.num_q_heads, shape.head_dim), device=device).to(shape.dtype)
            sdpa, sdpa_bytes = _sdpa_call(store, seqs, q, shape)
            # The baseline is the faster of SDPA replayed in a graph and SDPA launched eagerly: on some runs the
            # graph replay was the slower of the two at batch 8, which would flatter every ratio against it.
            sdpa_graph_us, sdpa_eager_us = timer.median_us(sdpa), eager.median_us(sdpa)
            sdpa_us = min(sdpa_graph_us, sdpa_eager_us)
            report["rows"].append({**_row(batch, context, "sdpa_contiguous", {}, sdpa_graph_us, sdpa_bytes, copy_bw,
                                          sdpa_us, sdpa_eager_us),
                                   "baseline": "graph" if sdpa_graph_us <= sdpa_eager_us else "eager"})
            for method, params in method_grid(context, methods, page_size):
                result = attend(store, seqs, 0, q, method, params)
                call = planned_call(store, seqs, q, method, params)
                eager_us = eager.median_us(call)
                try:
                    us = timer.median_us(call)
                except RuntimeError as exc:  # a path that syncs with the host cannot be captured in a graph
                    print(f"  {method} {params}: no CUDA graph ({type(exc).__name__}); eager time reported")
                    torch.cuda.synchronize()
                    us = eager_us
                report["rows"].append(_row(batch, context, method, params, us, result.bytes_read, copy_bw, sdpa_us,
                                           eager_us))
            if "sparq" in methods and device.type == "cuda":
                report["rows"].extend(_sparq_stage_rows(store, seqs, q, shape, timer, copy_bw, sdpa_us))
            if "gate" in methods and device.type == "cuda":
                report["rows"].extend(_gate_stage_rows(store, seqs, q, shape, timer, copy_bw, sdpa_us))
            del store
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def planned_call(store: KVStore, seqs: list[str], q: torch.Tensor, method: str, params: dict):
    """The attention of one decode step with the page table planned beforehand (FlashInfer's plan/run split): the
    method's GPU selection and the attention kernels, what a CUDA graph of a decode step replays."""
    m = METHODS[method]
    p = m.parse(params)
    inputs = LayerInputs(store, seqs, 0, store.page_table(seqs, 0))
    if m.needs_value_mean:
        inputs.value_mean  # noqa: B018 (read once here, as a planned step would)
    if q.device.type != "cuda":
        return lambda: m.reference(q, inputs, p)
    return lambda: attend_triton(q, inputs, m.select_gpu(q, inputs, p), p.scale)


def _row(batch, context, method, params, us, nbytes, copy_bw, sdpa_us, eager_us=None) -> dict:
    bw = nbytes / (us * 1e-6)
    row = {
        "batch": batch, "context": context, "method": method, "params": params, "time_us": us,
        "eager_time_us": eager_us,
        "bytes_read": nbytes, "bandwidth_GBps": bw / 1e9, "fraction_of_copy": bw / copy_bw,
        "speedup_vs_sdpa": sdpa_us / us,
    }
    p = ",".join(f"{k}={v}" for k, v in params.items()) or "-"
    print(f"{batch:>2} {context:>8} {method:<7} {p:<28} {us:>9.1f} {nbytes / 1e6:>9.1f} "
          f"{bw / 1e9:>7.0f} {bw / copy_bw:>7.2f} {sdpa_us / us:>7.2f}x" + (f" {eager_us:>9.1f}" if eager_us else ""))
    return row


def _sdpa_call(store: KVStore, seqs: list[str], q: torch.Tensor, shape: Shape):
    """SDPA over the same K/V copied to contiguous [B, Hkv, S, d] tensors (GQA by enable_gqa), and its bytes."""
    csr = store.page_table(seqs, 0)
    view = store.layer_view(0)
    pages = csr.indices.long().view(shape.batch, -1)

    def contiguous(pool: torch.Tensor) -> torch.Tensor:
        x = pool[pages]  # [B, n, Hkv, P, d]
        return (x.permute(0, 2, 1, 3, 4).reshape(shape.batch, shape.num_kv_heads, -1, shape.head_dim)
                [:, :, : shape.context].contiguous())
    k, v = contiguous(view.k_seq), contiguous(view.v_seq)
    q4 = q[:, :, None, :]
    nbytes = dense_bytes(csr.host_lens, shape.num_kv_heads, shape.head_dim, k.element_size())
    return (lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)), nbytes


def _sparq_stage_rows(store, seqs, q, shape: Shape, timer: Timer, copy_bw: float, sdpa_us: float) -> list[dict]:
    """Each SparQ kernel timed alone on the intermediates of a real run, with the bytes it must read."""
    from kvcache.kernels.sparq import sparq_select, sparq_stage1, sparq_stage2
    from kvcache.kernels.topk import select_topk

    csr = store.page_table(seqs, 0)
    view = store.layer_view(0)
    vbar = store.value_mean(seqs, 0)
    Hkv, d, item = shape.num_kv_heads, shape.head_dim, torch.empty((), dtype=shape.dtype).element_size()
    S = shape.context
    rows = []
    for r, k in ((16, S // 16), (32, S // 8)):
        s1 = sparq_stage1(q, view.k_dim, csr, r)
        positions = sparq_select(s1, csr, Hkv, k, k // 4)
        stage1_bytes = shape.batch * Hkv * S * r * item
        stage2_bytes = sparq_bytes(csr.host_lens, Hkv, d, 0, k, item)
        us1 = timer.median_us(lambda: sparq_stage1(q, view.k_dim, csr, r))
        # Timed alone, each selection zeroes a workspace of its own (a memset the step leaves to stage 1).
        us_sel = timer.median_us(lambda: sparq_select(s1, csr, Hkv, k, k // 4))
        us2 = timer.median_us(lambda: sparq_stage2(q, view.k_seq, view.v_seq, vbar, csr, s1, positions))
        # torch.topk over the same scores is the selection baseline.
        scores = torch.rand((shape.batch * Hkv, S), device=q.device)
        n = torch.full((shape.batch * Hkv,), S, dtype=torch.int32, device=q.device)
        us_radix = timer.median_us(lambda: select_topk(scores, k, n, in_registers=False))
        us_torch = timer.median_us(lambda: torch.topk(scores, k, dim=-1))
        params = {"r": r, "k": k, "local_window": k // 4}
        rows.append(_row(shape.batch, S, "sparq.stage1", params, us1, stage1_bytes, copy_bw, sdpa_us))
        # The selection's bytes: the G float32 logits per position stage 1 wrote, read back once.
        select_bytes = s1.logits.shape[0] * s1.logits.shape[1] * S * s1.logits.element_size()
        rows.append(_row(shape.batch, S, "sparq.select", params, us_sel, select_bytes, copy_bw, sdpa_us))
        rows.append(_row(shape.batch, S, "sparq.stage2", params, us2, stage2_bytes, copy_bw, sdpa_us))
        rows.append(_row(shape.batch, S, "topk.radix", {"k": k}, us_radix, 0, copy_bw, us_torch))
        rows.append(_row(shape.batch, S, "topk.torch", {"k": k}, us_torch, 0, copy_bw, us_torch))
    return rows


def _gate_stage_rows(store, seqs, q, shape: Shape, timer: Timer, copy_bw: float, sdpa_us: float,
                     budget: int = 4096) -> list[dict]:
    """The gate step's parts timed alone (§3): scoring (query GEMV + scores against the cached gate keys, in
    the KV dtype and in float32), scoring + page selection, and the attention over the chosen pages."""
    from kvcache.kernels.gate_score import gate_queries_triton, gate_scores_triton, select_pages
    from kvcache.kernels.paged_decode import MODE_PAGES, attend_partial_and_merge
    from kvcache.methods.gate import gate_budget_pages, gate_bytes, gate_key_bytes
    from kvcache.methods.gate_store import layer_gate_of

    csr = store.page_table(seqs, 0)
    view = store.layer_view(0)
    lg = layer_gate_of(store, 0)
    P, Hkv, d, dg = shape.page_size, shape.num_kv_heads, shape.head_dim, lg.shape.gate_dim
    budget = min(budget, shape.context)
    n = -(-shape.context // P)
    budget_pages = -(-budget // P)
    t = gate_budget_pages(shape.context, P, budget)
    weights = (lg.q_weight.numel() + lg.q_bias.numel()) * lg.q_weight.element_size()  # read once per step
    rows = [_row(shape.batch, shape.context, "gate.query", {"budget": budget},
                 timer.median_us(lambda: gate_queries_triton(q, lg, csr)), weights, copy_bw, sdpa_us)]
    for keys in (lg.keys, lg.keys.float()):
        def score(keys=keys):
            return gate_scores_triton(gate_queries_triton(q, lg, csr), keys, csr, budget_pages)
        nbytes = weights + shape.batch * Hkv * gate_key_bytes(n, dg, keys.element_size())
        rows.append(_row(shape.batch, shape.context, "gate.score", {"budget": budget, "keys": str(keys.dtype)[6:]},
                         timer.median_us(score), nbytes, copy_bw, sdpa_us))

    def choose():
        _, sel, counts, ws = gate_scores_triton(gate_queries_triton(q, lg, csr), lg.keys, csr, budget_pages)
        return select_pages(sel, counts, ws, t)
    rows.append(_row(shape.batch, shape.context, "gate.choose", {"budget": budget}, timer.median_us(choose),
                     weights + shape.batch * Hkv * gate_key_bytes(n, dg, lg.keys.element_size()), copy_bw, sdpa_us))
    chosen = choose()
    list_len = torch.full((shape.batch * Hkv,), t, dtype=torch.int32, device=q.device)
    attend_us = timer.median_us(lambda: attend_partial_and_merge(
        q, view.k_seq, view.v_seq, csr, t * P, MODE_PAGES, item_list=chosen, list_len=list_len))
    pages = [[gate_budget_pages(S, P, budget)] * Hkv for S in csr.host_lens]
    kv_bytes = gate_bytes(csr.host_lens, P, pages, d, view.k_seq.element_size(), dg, 0)  # rows only
    rows.append(_row(shape.batch, shape.context, "gate.attend", {"budget": budget}, attend_us, kv_bytes, copy_bw,
                     sdpa_us))
    return rows


def main(args) -> int:
    """Entry of `kvcache bench decode`: run, print the table, write JSON if asked."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    contexts = [int(c) for c in args.context.split(",")] if args.context else (
        [8192, 32768, 131072, 524288] if device.type == "cuda" else [1024, 4096])
    batches = [int(b) for b in args.batch.split(",")] if args.batch else ([1, 8] if device.type == "cuda" else [1])
    methods = args.methods.split(",")
    report = run(contexts, batches, methods, device, iters=args.iters, page_size=args.page_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
