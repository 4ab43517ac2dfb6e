"""`kvcache bench e2e`: whole decode steps of a Llama-architecture model through kvcache, per method, against a plain
static-cache baseline of the same model in the same run.

Per row (model shape, context, batch, method, path): milliseconds per decode step (CUDA events around each step,
median), tokens per second, the bytes one step must read (the weights once, plus the method's attention bytes over
every layer), the bandwidth that implies, and the ratio to dense. Paths:

- `graph`: the engine's whole step replayed from a captured CUDA graph (engine/graph_decode.py), with its planning,
  buffer loads and bookkeeping on the host included, as `kvcache generate --device cuda` runs it;
- `planned`: the engine's decode step eagerly (client.begin_step: the step checked and planned once, each layer's
  call device work and launches only);
- `per-call`: the same step with every layer's call an attend(..., plan=) (validation in every call), eager;
- `static-graph`, `static-eager`: the baseline, a contiguous [B, Hkv, S, d] cache per layer read by SDPA with the
  step captured as one CUDA graph (as gpt-fast does), and the same eagerly.

Models have random weights in bfloat16 (the timings do not depend on the values); the cache of every sequence is
filled with random K/V up to the context before the timed steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcache import InProcessClient, KVCacheConfig
from kvcache.bench.timing import median_ms, run_header, write_report
from kvcache.clients.inprocess import PlannedCalls
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import AttentionSpec, decode_step
from kvcache.engine.graph_decode import GRAPH_METHODS, GraphDecoder, graph_unsupported
from kvcache.engine.model import Llama, random_model
from kvcache.methods.registry import lookup

SHAPES = {
    "smollm2-135m": ModelConfig(49152, 576, 1536, 30, 9, 3, 64, max_position_embeddings=1 << 20,
                                tie_word_embeddings=True),
    "llama-2-7b": ModelConfig(32000, 4096, 11008, 32, 32, 32, 128, max_position_embeddings=1 << 20),
    "llama-3-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, 128, rope_theta=500000.0,
                              max_position_embeddings=1 << 20),
    "tiny": ModelConfig(256, 64, 128, 2, 4, 2, 16, max_position_embeddings=1 << 20),  # for the CPU test
}
P = 16


def _method_params(method: str, context: int) -> dict:
    """Each method at 1/8 of dense's attention bytes where it has a rule for that (SparQ r=16, k=S/16)."""
    if method == "sparq":
        return {"r": 16, "k": context // 16, "local_window": min(64, context // 64)}
    if method == "quest":
        return {"top_pages": max(2, context // 16 // P)}
    if method == "window":
        return {"window": context // 16, "sinks": 4}
    return {}


def _weight_bytes(model: Llama) -> int:
    # A tied embedding is read once, as the output matrix; the input embedding reads B rows only.
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name
               ) + model.output_weight.numel() * model.output_weight.element_size() * (model.lm_head is None)


class _PerCall:
    """A client whose begin_step makes every layer's call an attend(..., plan=): the path before steps were
    planned once."""

    def __init__(self, client: InProcessClient) -> None:
        self.client = client
        self.config = client.config

    def begin_step(self, seq_ids, q_heads, method="dense", params=None, backend="auto", layer_methods=None):
        return PlannedCalls(self.client, seq_ids, method, params, backend, layer_methods)


def _kvcache_rows(model: Llama, shape: str, context: int, batch: int, methods: list[str], steps: int,
                  device: torch.device, weight_bytes: int) -> list[dict]:
    c = model.config
    grown = (len(methods) * 2 + 1) * (steps + 1)  # every timed step appends a position
    pages = batch * ((context + grown) // P + 2)
    client = InProcessClient(KVCacheConfig(c.num_layers, c.num_kv_heads, c.head_dim, page_size=P,
                                           dtype=model.dtype, device=device, device_pages=pages))
    gen = torch.Generator(device=device).manual_seed(0)
    seqs = []
    for _ in range(batch):
        sid = client.create().seq_id
        for s0 in range(0, context, 4096):
            n = min(4096, context - s0)
            kv = torch.randn((2, c.num_layers, n, c.num_kv_heads, c.head_dim), generator=gen, device=device)
            client.append(sid, kv[0].to(model.dtype), kv[1].to(model.dtype))
        seqs.append(sid)
    rows = []
    tokens = [1] * batch
    for method in methods:
        params = _method_params(method, context)
        spec = AttentionSpec(method, params)
        attention = lookup(method).bytes_read(client.config, [context] * batch, lookup(method).parse(params))
        paths = [("planned", client), ("per-call", _PerCall(client))]
        if method in GRAPH_METHODS and graph_unsupported(client, model) is None:
            paths.insert(0, ("graph", GraphDecoder(model, client)))
        for path, target in paths:
            def one_step(target=target, spec=spec):
                positions = [client.describe(s).length for s in seqs]
                if isinstance(target, GraphDecoder):
                    target.step(seqs, tokens, positions, spec.method, spec.params)
                else:
                    decode_step(model, target, seqs, tokens, positions, spec)

            ms = median_ms(one_step, steps, device)
            step_bytes = weight_bytes + attention * c.num_layers
            rows.append({"shape": shape, "context": context, "batch": batch, "method": method, "params": params,
                         "path": path, "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms,
                         "bytes_per_step": step_bytes, "attention_bytes_per_step": attention * c.num_layers,
                         "implied_GBps": step_bytes / ms / 1e6})
    return rows


def _static_rows(model: Llama, shape: str, context: int, batch: int, steps: int, device: torch.device,
                 weight_bytes: int) -> list[dict]:
    """The baseline: a contiguous cache per layer, SDPA over the positions written, graph-captured and eager."""
    c = model.config
    S = context + 2 * steps + 8
    cache_k = torch.randn((c.num_layers, batch, c.num_kv_heads, S, c.head_dim), device=device).to(model.dtype)
    cache_v = torch.randn_like(cache_k)
    position = torch.full((batch, 1), context, dtype=torch.long, device=device)
    ids = torch.ones((batch, 1), dtype=torch.long, device=device)
    arange = torch.arange(S, device=device)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        at = position[0, 0]  # every sequence is at the same length here
        cache_k[layer].index_copy_(2, at.view(1), k.transpose(1, 2))
        cache_v[layer].index_copy_(2, at.view(1), v.transpose(1, 2))
        mask = (arange <= at)[None, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), cache_k[layer], cache_v[layer], attn_mask=mask,
                                             enable_gqa=c.num_heads != c.num_kv_heads)
        return out.transpose(1, 2)

    def step():
        model(ids, position, attend, last_only=True)
        position.add_(1)

    eager_ms = median_ms(step, steps, device)
    rows = [{"shape": shape, "context": context, "batch": batch, "method": "dense", "path": "static-eager",
             "ms_per_step": eager_ms}]
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        rows.append({"shape": shape, "context": context, "batch": batch, "method": "dense",
                     "path": "static-graph", "ms_per_step": median_ms(graph.replay, steps, device)})
    kv_bytes = 2 * c.num_layers * batch * c.num_kv_heads * context * c.head_dim * cache_k.element_size()
    for row in rows:
        row.update(tokens_per_s=batch * 1e3 / row["ms_per_step"], bytes_per_step=weight_bytes + kv_bytes,
                   attention_bytes_per_step=kv_bytes,
                   implied_GBps=(weight_bytes + kv_bytes) / row["ms_per_step"] / 1e6)
    return rows


def run(cases: list[tuple[str, int, int]], methods: list[str], steps: int, device: torch.device) -> dict:
    """Every (shape, context, batch) case; returns the JSON-ready report."""
    report: dict = {**run_header(device), "steps": steps, "rows": []}
    print(f"{'shape':<13} {'ctx':>7} {'B':>3} {'method':<7} {'path':<13} {'ms/step':>8} {'tok/s':>8} "
          f"{'GB/s':>7} {'vs dense':>8} {'bound':>6} {'vs graph':>8}")
    for shape, context, batch in cases:
        model = random_model(SHAPES[shape], seed=0, dtype=torch.bfloat16, device=device)
        weight_bytes = _weight_bytes(model)
        rows = _static_rows(model, shape, context, batch, steps, device, weight_bytes)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows += _kvcache_rows(model, shape, context, batch, methods, steps, device, weight_bytes)
        dense = {r["path"]: r for r in rows if r["method"] == "dense"}
        for row in rows:
            base = dense[row["path"] if row["path"] in dense else "planned"]
            row["speedup_vs_dense"] = base["ms_per_step"] / row["ms_per_step"]  # dense on the same path
            row["bound_vs_dense"] = base["bytes_per_step"] / row["bytes_per_step"]  # what the bytes predict
            if "graph" in dense:  # against what `kvcache generate` runs for dense
                row["speedup_vs_dense_graph"] = dense["graph"]["ms_per_step"] / row["ms_per_step"]
            print(f"{shape:<13} {context:>7} {batch:>3} {row['method']:<7} {row['path']:<13} "
                  f"{row['ms_per_step']:>8.2f} {row['tokens_per_s']:>8.1f} {row['implied_GBps']:>7.0f} "
                  f"{row['speedup_vs_dense']:>8.2f} {row['bound_vs_dense']:>6.2f} "
                  f"{row.get('speedup_vs_dense_graph', float('nan')):>8.2f}")
        report["rows"].extend(rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def main(args) -> int:
    """Entry of `kvcache bench e2e`."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = []
    for case in args.cases.split(","):
        shape, context, batch = case.split(":")
        cases.append((shape, int(context), int(batch)))
    report = run(cases, args.methods.split(","), args.steps, device)
    write_report(report, args.json)
    return 0


def add_arguments(p) -> None:
    """Flags of `kvcache bench e2e`."""
    p.add_argument("--cases", default="smollm2-135m:4096:1,smollm2-135m:4096:8,llama-3-8b:32768:1",
                   help="shape:context:batch,... (shapes: " + ", ".join(SHAPES) + ")")
    p.add_argument("--methods", default="dense,sparq,quest,window", help="decode methods, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per row (median reported)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", help="write the report here")
