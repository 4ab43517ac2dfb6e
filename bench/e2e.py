"""`kvcache bench e2e`: whole decode steps of a Llama-architecture model through kvcache, per method, against a plain
static-cache baseline of the same model in the same run.

Per row (model shape, context, batch, method, path): milliseconds per decode step (CUDA events around a burst of
back-to-back steps, nothing waited for between them as in an engine's loop; the median over rounds), tokens per
second, the bytes one step must read (the weights once, plus the method's attention bytes over every layer), the
bandwidth that implies, that time over the bytes' time at the device's copy rate (measured in the
same run), the fraction of the step the GPU is busy (kernel time from the profiler over the step's time), the host's
time in one step's call (`host_ms`: where it exceeds the GPU's, the loop is bound by the host) and the
ratio to dense beside what the bytes predict. Paths:

- `graph`: the engine's whole step replayed from a captured CUDA graph (engine/graph_decode.py), with its planning,
  buffer loads and bookkeeping on the host included, each step fed the previous one's greedy token on the device;
- `planned`: the engine's decode step eagerly (client.begin_step: the step checked and planned once, each layer's
  call device work and launches only);
- `per-call`: the same step with every layer's call an attend(..., plan=) (validation in every call), eager;
- `remote-pool`, `remote-local`, `remote-grpc`: the step of an engine whose store is a `kvcache serve` on this host:
  leased on the server's shared page pool (`--share-pool`) and run in the engine, replayed from its captured graph
  where the `graph` path is (16 steps to a lease, timed in bursts of 16, as the `graph` path then is too; else
  planned, one step a lease); or
  planned, with every layer call sent to the server over its local data plane (a Unix socket) or over gRPC;
- `static-graph`, `static-eager`: the baseline, a contiguous [B, Hkv, S, d] cache per layer read by SDPA with the
  step captured as one CUDA graph (as gpt-fast does), and the same eagerly.

Models have random weights, bfloat16 on CUDA and float32 on the CPU (the timings do not depend on the values); the
cache of every sequence is filled with random K/V up to the context before the timed steps. The kvcache rows are
timed interleaved, one burst of each per round.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kvcache import InProcessClient, KVCacheConfig
from kvcache.bench.server_process import ServerProcess
from kvcache.bench.timing import Timer, gpu_ms_per_call, interleaved_ms, median_ms, run_header, write_report
from kvcache.clients.inprocess import PlannedCalls
from kvcache.clients.remote import RemoteClient
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import AttentionSpec, decode_step
from kvcache.engine.graph_decode import GRAPH_METHODS, GraphDecoder, LeasedGraphDecoder, graph_unsupported
from kvcache.engine.model import Llama, random_model
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate
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
PATHS = ("static-graph", "static-eager", "graph", "planned", "per-call", "remote-pool", "remote-local", "remote-grpc")
# The remote paths' data planes: a `kvcache serve` on this host, reached over its local socket or over gRPC.
# (data_plane, share_pool) of each remote path's client.
REMOTE_PATHS = {"remote-pool": ("shared", True), "remote-local": ("shared", False), "remote-grpc": ("grpc", False)}
BURST = 4  # back-to-back steps per timing: one step's host work overlaps the previous step's GPU work
# A remote engine's captured steps on the shared pool, leased this many at a time and timed in bursts of as many:
# each burst then holds one lease's round trip, and its median is the time per step with that round trip shared out.
POOL_STEPS_PER_LEASE = 16


def _method_params(method: str, context: int, head_dim: int) -> dict:
    """Each method at 1/8 of dense's attention bytes where it has a rule for that (SparQ r=d/8, k=S/16)."""
    if method == "sparq":
        return {"r": head_dim // 8, "k": context // 16, "local_window": min(64, context // 64)}
    if method == "quest":
        return {"top_pages": max(2, context // 16 // P)}
    if method == "window":
        return {"window": context // 16, "sinks": 4}
    if method == "gate":  # SeerAttention's decode budget (docs/sparse-attention.md §3), S/16 at short contexts
        return {"budget": min(4096, context // 16)}
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


def _busy(fn, ms: float, device: torch.device) -> dict:
    """On CUDA, the fraction of a step of `ms` milliseconds the GPU is busy (kernel time profiled over 5 steps)."""
    gpu_ms = gpu_ms_per_call(fn, 5, device)
    return {"gpu_busy": min(1.0, gpu_ms / ms)} if gpu_ms else {}


def _fill(client, batch: int, context: int, model: Llama, device: torch.device) -> list[str]:
    """`batch` new sequences of `context` random positions in every layer, through `client`."""
    c = model.config
    gen = torch.Generator(device=device).manual_seed(0)
    seqs = []
    for _ in range(batch):
        sid = client.create().seq_id
        for s0 in range(0, context, 1024):  # 1024 positions of the 8B shape in bfloat16: 64 MiB, gRPC's limit
            n = min(1024, context - s0)
            kv = torch.randn((2, c.num_layers, n, c.num_kv_heads, c.head_dim), generator=gen, device=device)
            client.append(sid, kv[0].to(model.dtype), kv[1].to(model.dtype))
        seqs.append(sid)
    return seqs


@contextlib.contextmanager
def _remote_clients(config: KVCacheConfig, wanted: set[str]) -> Iterator[dict[str, RemoteClient]]:
    """A `kvcache serve` subprocess with `config`'s store and a client per remote path in `wanted` (none: no
    server), closed and stopped on exit. The server computes on one thread: with as many as the engine (2 on the
    2-core machine) the engine's idle OpenMP workers and the server's fought for the cores, and steps took 6% longer."""
    paths = [path for path in REMOTE_PATHS if path in wanted]
    if not paths:
        yield {}
        return
    # The pool path has sequences of its own (a captured step holds them until the next one): twice the pages.
    pooled = "remote-pool" in paths
    flags = ["--layers", str(config.num_layers), "--kv-heads", str(config.num_kv_heads), "--head-dim",
             str(config.head_dim), "--page-size", str(config.page_size), "--dtype",
             str(config.dtype).removeprefix("torch."), "--device", str(config.device), "--pages",
             str(config.device_pages * (2 if pooled else 1)), "--torch-threads", "1", *(["--share-pool"] * pooled)]
    with tempfile.NamedTemporaryFile(prefix="kvcache-e2e-serve-", suffix=".log") as log:
        server = ServerProcess(flags, log.name)
        clients = {path: RemoteClient(server.target, data_plane=REMOTE_PATHS[path][0], share_pool=REMOTE_PATHS[path][1])
                   for path in paths}
        try:
            yield clients
        finally:
            for client in clients.values():
                client.close()
            server.stop()


def _kvcache_rows(model: Llama, shape: str, context: int, batch: int, methods: list[str], steps: int,
                  device: torch.device, weight_bytes: int, wanted: set[str], gate: bool = False) -> list[dict]:
    """Every (method, path) interleaved: each round times one burst of each, so that a machine's drift (clocks, other
    tenants) falls on all of them alike; the median per row. The in-process paths share one store (with a page gate
    of random weights if `gate`), the remote ones one `kvcache serve` with the same store."""
    c = model.config
    pairs = [(method, path) for method in methods for path in PATHS[2:] if path in wanted]
    grown = (len(pairs) + 1) * (steps * max(BURST, POOL_STEPS_PER_LEASE) + 8)  # every timed or profiled step appends
    config = KVCacheConfig(c.num_layers, c.num_kv_heads, c.head_dim, page_size=P, dtype=model.dtype, device=device,
                           device_pages=batch * ((context + grown) // P + 2))
    client = InProcessClient(config)
    if gate:  # random weights: a gate's cost does not depend on what it learned
        attach_gate(client.store, PageGate(GateShape(c.num_layers, c.num_kv_heads, c.num_heads // c.num_kv_heads,
                                                     c.head_dim, P, model_rope_base=c.rope_theta)))
    seqs = _fill(client, batch, context, model, device)
    tokens = [1] * batch
    graphs = graph_unsupported(client, model) is None
    with _remote_clients(config, wanted) as remotes:
        messages = [r for path, r in remotes.items() if path != "remote-pool"]
        remote_seqs = _fill(messages[0], batch, context, model, device) if messages else []
        pool_seqs = _fill(remotes["remote-pool"], batch, context, model, device) if "remote-pool" in remotes else []
        local_positions, remote_positions = [context] * batch, [context] * batch  # shared by their paths' steps
        pool_positions = [context] * batch
        steps_of, host_ms = {}, {}
        for method, path in pairs:
            if path == "graph" and not (graphs and method in GRAPH_METHODS) or path in remotes and method == "gate":
                continue  # the remote paths' server holds no gate
            if path in REMOTE_PATHS and path not in remotes:
                continue
            if path == "remote-pool":  # the engine's graph where it has one, on the mapped pool
                target = (LeasedGraphDecoder(model, remotes[path], steps_per_lease=POOL_STEPS_PER_LEASE)
                          if graphs and method in GRAPH_METHODS else remotes[path])
                ids, positions = pool_seqs, pool_positions
            elif path in remotes:
                target, ids, positions = remotes[path], remote_seqs, remote_positions
            elif path == "graph":
                target, ids, positions = GraphDecoder(model, client), seqs, local_positions
            else:
                target, ids, positions = (client if path == "planned" else _PerCall(client)), seqs, local_positions
            spec = AttentionSpec(method, _method_params(method, context, c.head_dim))

            host_ms[(method, path)] = []

            # The sequences' lengths are kept here, as an engine keeps them, not asked of the store every step.
            def one_step(target=target, spec=spec, ids=ids, positions=positions, host=host_ms[(method, path)]):
                t0 = time.perf_counter()
                if isinstance(target, GraphDecoder | LeasedGraphDecoder):  # a greedy loop: tokens stay on the device
                    target.step(ids, tokens if target.greedy is None or len(target.greedy) != len(ids)
                                else target.greedy, positions, spec.method, spec.params)
                else:
                    decode_step(model, target, ids, tokens, positions, spec)
                host.append((time.perf_counter() - t0) * 1e3)
                positions[:] = [n + 1 for n in positions]

            steps_of[(method, path)] = one_step
        bursts = {pair: BURST for pair in steps_of}
        # The pool's captured steps are timed in bursts of one lease; the in-process graph's, which it is measured
        # against, in bursts as long, so that both share a burst's first launch alike.
        leased = {pair for pair in steps_of if pair[1] == "remote-pool" and graphs and pair[0] in GRAPH_METHODS}
        bursts.update({pair: POOL_STEPS_PER_LEASE for pair in steps_of
                       if pair in leased or (pair[1] == "graph" and (pair[0], "remote-pool") in leased)})
        times = interleaved_ms(steps_of, steps, device, bursts)
        rows = []
        for (method, path), one_step in steps_of.items():
            params = _method_params(method, context, c.head_dim)
            attention = lookup(method).bytes_read(config, [context] * batch, lookup(method).parse(params))
            ms = times[(method, path)]
            rows.append({"shape": shape, "context": context, "batch": batch, "method": method, "params": params,
                         "path": path, "ms_per_step": ms, "burst": bursts[(method, path)],
                         "host_ms": statistics.median(host_ms[(method, path)]),
                         **_busy(one_step, ms, device),
                         "bytes_per_step": weight_bytes + attention * c.num_layers,
                         "attention_bytes_per_step": attention * c.num_layers})
    return rows


def _static_rows(model: Llama, shape: str, context: int, batch: int, steps: int, device: torch.device,
                 weight_bytes: int, wanted: set[str]) -> list[dict]:
    """The baseline: a contiguous cache per layer, SDPA over the positions written, graph-captured and eager."""
    c = model.config
    S = context + 4 * steps * BURST + 16
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

    rows = []
    if "static-eager" in wanted:
        ms = median_ms(step, steps, device, BURST)
        rows.append({"shape": shape, "context": context, "batch": batch, "method": "dense", "path": "static-eager",
                     "ms_per_step": ms, **_busy(step, ms, device)})
    if device.type == "cuda" and "static-graph" in wanted:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = median_ms(graph.replay, steps, device, BURST)
        rows.append({"shape": shape, "context": context, "batch": batch, "method": "dense",
                     "path": "static-graph", "ms_per_step": ms, **_busy(graph.replay, ms, device)})
    kv_bytes = 2 * c.num_layers * batch * c.num_kv_heads * context * c.head_dim * cache_k.element_size()
    for row in rows:
        row.update(bytes_per_step=weight_bytes + kv_bytes, attention_bytes_per_step=kv_bytes)
    return rows


def run(cases: list[tuple[str, int, int]], methods: list[str], steps: int, device: torch.device,
        paths: set[str] | None = None, dtype: torch.dtype | None = None) -> dict:
    """Every (shape, context, batch) case on the given paths (default: all), weights and cache in `dtype` (default:
    bfloat16 on CUDA, float32 on the CPU, whose bfloat16 matmuls are slow); returns the JSON-ready report."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    wanted = set(PATHS) if paths is None else paths
    copy_Bps = Timer(device, iters=20).copy_bandwidth()
    report: dict = {**run_header(device), "steps": steps, "dtype": str(dtype).removeprefix("torch."),
                    "copy_GBps": copy_Bps / 1e9, "rows": []}
    print(f"device copy bandwidth {copy_Bps / 1e9:.0f} GB/s (read + write)")
    print(f"{'shape':<13} {'ctx':>7} {'B':>3} {'method':<7} {'path':<13} {'ms/step':>8} {'tok/s':>8} "
          f"{'GB/s':>7} {'x bytes':>7} {'busy':>5} {'host ms':>7} {'vs dense':>8} {'bound':>6} {'vs graph':>8}")
    for shape, context, batch in cases:
        model = random_model(SHAPES[shape], seed=0, dtype=dtype, device=device)
        model.for_decoding()
        weight_bytes = _weight_bytes(model)
        rows = _static_rows(model, shape, context, batch, steps, device, weight_bytes, wanted)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows += _kvcache_rows(model, shape, context, batch, [m for m in methods if m != "gate"], steps, device,
                              weight_bytes, wanted)
        if "gate" in methods:
            # On a store of its own, after the others' is gone: an attached gate recomputes the page key of each
            # sequence's last page in every step of every method, which a store without a gate does not pay.
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows += _kvcache_rows(model, shape, context, batch, ["gate"], steps, device, weight_bytes, wanted, True)
        dense = {r["path"]: r for r in rows if r["method"] == "dense"}
        for row in rows:
            ms, nbytes = row["ms_per_step"], row["bytes_per_step"]
            row.update(tokens_per_s=batch * 1e3 / ms, implied_GBps=nbytes / ms / 1e6,
                       # the step's time over its bytes' time at the copy rate (read + write bytes per second)
                       vs_copy_bound=ms / (nbytes / copy_Bps * 1e3))
            base = dense.get(row["path"]) or dense.get("planned") or row
            row["speedup_vs_dense"] = base["ms_per_step"] / row["ms_per_step"]  # dense on the same path
            row["bound_vs_dense"] = base["bytes_per_step"] / row["bytes_per_step"]  # what the bytes predict
            if "graph" in dense:  # against what `kvcache generate` runs for dense
                row["speedup_vs_dense_graph"] = dense["graph"]["ms_per_step"] / row["ms_per_step"]
            print(f"{shape:<13} {context:>7} {batch:>3} {row['method']:<7} {row['path']:<13} "
                  f"{row['ms_per_step']:>8.2f} {row['tokens_per_s']:>8.1f} {row['implied_GBps']:>7.0f} "
                  f"{row['vs_copy_bound']:>7.2f} {row.get('gpu_busy', float('nan')):>5.2f} "
                  f"{row.get('host_ms', float('nan')):>7.2f} "
                  f"{row['speedup_vs_dense']:>8.2f} {row['bound_vs_dense']:>6.2f} "
                  f"{row.get('speedup_vs_dense_graph', float('nan')):>8.2f}")
        report["rows"].extend(rows)
        del model, rows
        gc.collect()  # the case's store and captured graphs (their private pools) go before the next case allocates
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
    report = run(cases, args.methods.split(","), args.steps, device, set(args.paths.split(",")),
                 getattr(torch, args.dtype) if args.dtype else None)
    write_report(report, args.json)
    return 0


def add_arguments(p) -> None:
    """Flags of `kvcache bench e2e`."""
    p.add_argument("--cases", default="smollm2-135m:4096:1,smollm2-135m:4096:8,llama-3-8b:32768:1",
                   help="shape:context:batch,... (shapes: " + ", ".join(SHAPES) + ")")
    p.add_argument("--methods", default="dense,sparq,quest,window,gate", help="decode methods, comma-separated")
    p.add_argument("--paths", default=",".join(PATHS), help="paths to time, comma-separated: " + ", ".join(PATHS))
    p.add_argument("--steps", type=int, default=20, help=f"timed bursts of {BURST} decode steps per row (median "
                   "reported)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="weights and cache (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--json", help="write the report here")
