"""`kvcache bench prefill`: MInference sparse prefill (docs/sparse-attention.md §2) against SDPA, one layer.

Llama-3-8B's attention shape (32 q heads, 8 kv heads, d=128, bf16, pages of 16), one prompt of
S positions prefilled as one chunk. Per pattern: time to build the index, time of the sparse
attention kernel, and both together, against `scaled_dot_product_attention(is_causal=True)` on
contiguous Q/K/V measured in the same run (CUDA events, L2 flushed, median). `causal` runs the
sparse kernel with every causal block listed: dense attention, so its ratio to SDPA is the
kernel's own efficiency, and its output is checked against SDPA's.

How sparse an index is depends on the data, so the run records its density: key tiles computed
over causal key tiles (block tiles plus column tiles of B keys). Random Q/K have no structure
and make vertical-slash indices nearly dense; the prompt here is synthetic but shaped like the
attention MInference targets (see `synthetic_prompt`). Real models' densities come from the
pattern search (`kvcache search-patterns`).

On a CPU it runs the torch reference at tiny sizes (`--device cpu --context 512`): a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial

import torch
import torch.nn.functional as F

from kvcache.bench.timing import Timer, run_header
from kvcache.config import KVCacheConfig
from kvcache.prefill.minference import minference_prefill
from kvcache.prefill.minference_index import (
    SparseIndex,
    a_shape_index,
    block_sparse_index,
    causal_index,
    vertical_slash_index,
)
from kvcache.store import KVStore

HQ, HKV, D = 32, 8, 128
CORRELATION_LENGTH = 4096  # positions over which a key stays similar to its neighbours
NUM_SINKS = 4
NUM_HEAVY = 1000  # heavy-hitter keys per kv head (vertical lines): as many as §2 keeps columns

# (pattern, params) rows: §2's reference sizes, and vertical-slash also at one of the search's
# candidates (the pattern search assigns sizes per head).
ROWS = [
    ("causal", {}),
    ("a_shape", {"n_init": 128, "n_local": 3968}),
    ("vertical_slash", {"n_vertical": 1000, "n_slash": 6096}),
    ("vertical_slash", {"n_vertical": 500, "n_slash": 700}),
    ("block_sparse", {"top_k": 100}),
]
PATTERNS = sorted({pattern for pattern, _ in ROWS})
SWEEP = [(4, 2), (4, 3), (4, 4), (8, 3)]  # (num_warps, num_stages) tried by --sweep
DATA = (f"synthetic: keys an AR(1) process over positions (correlation length {CORRELATION_LENGTH}), each "
        f"query its own key plus noise (a local band of slowly decaying attention), {NUM_SINKS} sink keys and "
        f"{NUM_HEAVY} heavy-hitter keys per kv head that every query favours (vertical lines); values N(0, 1)")


def synthetic_prompt(S: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """q [S, HQ, D], k, v [S, HKV, D] whose attention has a local band, sinks and vertical lines (see DATA).

    Scaled logits: about 9 at distance 0 decaying with exp(-distance / CORRELATION_LENGTH), about
    7 for the sinks and 5 for the heavy hitters, against noise of about 1.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    G = HQ // HKV
    base = _ar1(S, CORRELATION_LENGTH, gen, device)  # [S, HKV, D], unit variance
    sink_dir = torch.randn((HKV, D), generator=gen, device=device)
    heavy_dir = torch.randn((HKV, D), generator=gen, device=device)
    k = base.clone()
    k[:NUM_SINKS] += 2.0 * sink_dir
    heavy = torch.randint(NUM_SINKS, S, (min(NUM_HEAVY, S), HKV), generator=gen, device=device)
    heads = torch.arange(HKV, device=device).expand_as(heavy)
    k[heavy, heads] += 1.5 * heavy_dir[heads]
    q = torch.empty((S, HQ, D), dtype=dtype, device=device)
    for s0 in range(0, S, 16384):  # float32 queries of 512K positions would take 8.6 GB at once
        s1 = min(S, s0 + 16384)
        noise = torch.randn((s1 - s0, HQ, D), generator=gen, device=device)
        qc = 0.8 * (base[s0:s1].repeat_interleave(G, dim=1) + 0.5 * noise)
        qc += (0.3 * sink_dir + 0.3 * heavy_dir).repeat_interleave(G, dim=0)
        q[s0:s1] = qc.to(dtype)
    v = torch.randn((S, HKV, D), generator=gen, device=device)
    return q, k.to(dtype), v.to(dtype)


def _ar1(S: int, corr_len: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[S, HKV, D] with unit variance and correlation exp(-|i-j| / corr_len) along positions.

    x_j = sum_t rho^t e_{j-t}, by doubling: after the step of shift s, each row holds 2s terms.
    """
    rho = math.exp(-1.0 / corr_len)
    x = torch.randn((S, HKV, D), generator=gen, device=device)
    shift = 1
    while shift < S:
        x[shift:] += rho**shift * x[:-shift].clone()
        shift *= 2
    return x * math.sqrt(1 - rho * rho)


def build_store(k: torch.Tensor, v: torch.Tensor, page_size: int) -> tuple[KVStore, str]:
    """A one-layer store holding k, v [S, HKV, D] as one sequence."""
    S = k.shape[0]
    config = KVCacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, page_size=page_size, dtype=k.dtype,
                           device=k.device, device_pages=-(-S // page_size) + 1)
    store = KVStore(config)
    seq = store.create().seq_id
    for s0 in range(0, S, 16384):
        store.append(seq, k[s0 : s0 + 16384], v[s0 : s0 + 16384], layer=0)
    return store, seq


def builder(pattern: str, params: dict, q, k_seq, csr, block_size: int):
    """A zero-argument callable building `pattern`'s index of the whole prompt (one chunk at 0)."""
    if pattern == "causal":
        return lambda: causal_index(q, 0, block_size=block_size)
    if pattern == "a_shape":
        return lambda: a_shape_index(q, 0, block_size=block_size, **params)
    if pattern == "vertical_slash":
        return lambda: vertical_slash_index(q, k_seq, csr, 0, block_size=block_size, **params)
    return lambda: block_sparse_index(q, k_seq, csr, 0, block_size=block_size, **params)


def density(index: SparseIndex) -> float:
    """Key tiles the kernel computes (blocks, plus columns in tiles of B) over the causal key tiles."""
    B = index.block_size
    tiles = index.block_count.long().sum() + ((index.column_count.long() + B - 1) // B).sum()
    causal = index.num_heads * sum(m + 1 for m in range(index.first_block, index.first_block + index.num_query_blocks))
    return float(tiles) / causal


def run(contexts: list[int], patterns: list[str], device: torch.device, dtype: torch.dtype, iters: int,
        page_size: int, block_size: int, sweep: bool = False) -> dict:
    """Time SDPA and every pattern at every context; returns the JSON-ready report.

    With `sweep` (GPU only), the kernel's attention time for the causal and the first
    vertical-slash rows is also measured at every SWEEP launch configuration, and SDPA with each
    of its backends forced (which one the baseline is).
    """
    if device.type == "cuda":
        from kvcache.kernels.sparse_prefill import NUM_STAGES, NUM_WARPS, sparse_prefill

        attention = sparse_prefill
        launch = {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
    else:
        attention, launch = minference_prefill, None  # the Triton kernels need a GPU (or the slow interpreter)
    timer = Timer(device, iters=iters, warmup=1, use_graphs=False)  # index builders sync on sizes
    report: dict = {
        **run_header(device),
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": str(dtype).removeprefix("torch."),
                  "page_size": page_size, "block_size": block_size},
        "attention": "kvcache.kernels.sparse_prefill" if launch else "kvcache.prefill.minference (torch reference)",
        "launch": launch,
        "data": DATA,
        "sdpa": "scaled_dot_product_attention(is_causal=True), K/V repeated to 32 heads, [1, H, S, d] contiguous",
        "rows": [],
    }
    print(f"device: {report['device']}  attention: {report['attention']}")
    print(f"{'context':>8} {'pattern':<15} {'params':<14} {'density':>8} {'index ms':>9} {'attn ms':>9} "
          f"{'total ms':>9} {'SDPA ms':>9} {'vs SDPA':>8}")
    for S in contexts:
        try:
            report["rows"].extend(_run_context(S, patterns, device, dtype, page_size, block_size, timer, attention,
                                               sweep and launch is not None))
        except torch.OutOfMemoryError as exc:
            print(f"{S:>8} skipped: out of memory")
            report["rows"].append({"context": S, "skipped": f"out of memory: {str(exc).splitlines()[0]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def _run_context(S, patterns, device, dtype, page_size, block_size, timer: Timer, attention, sweep) -> list[dict]:
    q, k, v = synthetic_prompt(S, device, dtype)
    store, seq = build_store(k, v, page_size)
    csr = store.page_table([seq], 0)
    view = store.layer_view(0)
    # SDPA on contiguous [1, H, S, d], K/V repeated per q head (enable_gqa may fall back to the
    # math backend, which materialises S x S scores).
    G = HQ // HKV
    q4 = q.permute(1, 0, 2)[None].contiguous()
    k4 = k.permute(1, 0, 2).repeat_interleave(G, dim=0)[None].contiguous()
    v4 = v.permute(1, 0, 2).repeat_interleave(G, dim=0)[None].contiguous()
    del k, v
    sdpa = partial(F.scaled_dot_product_attention, q4, k4, v4, is_causal=True)
    sdpa_ms = timer.median_us(sdpa) / 1e3
    backends = _sdpa_backends(S, sdpa, timer, sdpa_ms) if sweep else []  # which backend the baseline's speed is
    tail = min(S, 1024)  # the last rows see the most keys; their SDPA output checks `causal`
    sdpa_tail = sdpa()[0, :, -tail:].permute(1, 0, 2).float()
    del sdpa, q4, k4, v4  # SDPA's copies make room for the indices
    rows = [{"context": S, "pattern": "sdpa", "params": {}, "total_ms": sdpa_ms, "speedup_vs_sdpa": 1.0}]
    print(f"{S:>8} {'sdpa':<15} {'-':<14} {1.0:>8.3f} {'':>9} {'':>9} {sdpa_ms:>9.2f} {sdpa_ms:>9.2f} {1.0:>7.2f}x")
    rows.extend(backends)
    for pattern, params in ROWS:
        if pattern not in patterns:
            continue
        build = builder(pattern, params, q, view.k_seq, csr, block_size)
        index = build()
        index_ms = timer.median_us(build) / 1e3
        attend = partial(attention, q, view.k_seq, view.v_seq, csr)
        attn_ms = timer.median_us(partial(attend, index)) / 1e3
        total_ms = timer.median_us(partial(_build_and_attend, build, attend)) / 1e3
        row = {
            "context": S, "pattern": pattern, "params": params, "density": density(index),
            "max_blocks": index.block_index.shape[-1], "max_columns": index.column_index.shape[-1],
            "index_ms": index_ms, "attention_ms": attn_ms, "total_ms": total_ms, "sdpa_ms": sdpa_ms,
            "speedup_vs_sdpa": sdpa_ms / total_ms, "attention_speedup_vs_sdpa": sdpa_ms / attn_ms,
        }
        if pattern == "causal":
            out, _ = attend(index)
            row["max_abs_err_vs_sdpa_last_rows"] = float((out[-tail:].float() - sdpa_tail).abs().max())
            del out
        rows.append(row)
        short = ",".join(str(x) for x in params.values()) or "-"
        print(f"{S:>8} {pattern:<15} {short:<14} {row['density']:>8.3f} {index_ms:>9.2f} {attn_ms:>9.2f} "
              f"{total_ms:>9.2f} {sdpa_ms:>9.2f} {sdpa_ms / total_ms:>7.2f}x")
        swept = sweep and (pattern, params) in (ROWS[0], ROWS[2])
        for num_warps, num_stages in SWEEP if swept else []:
            launch = {"num_warps": num_warps, "num_stages": num_stages}
            try:
                ms = timer.median_us(partial(attend, index, **launch)) / 1e3
            except Exception as exc:  # a launch that does not fit the device (triton's OutOfResources)
                if type(exc).__name__ != "OutOfResources":
                    raise
                rows.append({"context": S, "pattern": f"sweep:{pattern}", "params": params, "launch": launch,
                             "skipped": str(exc).splitlines()[0]})
                print(f"{S:>8} {pattern:<15} {launch}: does not fit ({str(exc).splitlines()[0]})")
                continue
            rows.append({"context": S, "pattern": f"sweep:{pattern}", "params": params, "attention_ms": ms,
                         "attention_speedup_vs_sdpa": sdpa_ms / ms, "launch": launch})
            print(f"{S:>8} {pattern:<15} {launch}: attention {ms:.2f} ms, {sdpa_ms / ms:.2f}x SDPA")
        del index
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _sdpa_backends(S: int, sdpa, timer: Timer, sdpa_ms: float) -> list[dict]:
    """SDPA's time with each backend forced (FlashAttention-2, cuDNN, memory-efficient), where it runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                ms = timer.median_us(sdpa) / 1e3
        except (RuntimeError, AttributeError) as exc:  # a backend this build or these inputs do not have
            rows.append({"context": S, "pattern": f"sdpa:{name.lower()}", "skipped": str(exc).splitlines()[0]})
            continue
        rows.append({"context": S, "pattern": f"sdpa:{name.lower()}", "total_ms": ms, "speedup_vs_sdpa": sdpa_ms / ms})
        print(f"{S:>8} sdpa backend {name.lower()}: {ms:.2f} ms")
    return rows


def _build_and_attend(build, attend):
    """One prefill of the layer as an engine runs it: build the index, then attend with it."""
    return attend(build())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kvcache bench prefill`."""
    parser.add_argument("--context", help="comma-separated prompt lengths (default GPU 32K,128K,512K; CPU 512)")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated, of {','.join(PATTERNS)}")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--page-size", type=int, default=16, help="positions per page (default 16)")
    parser.add_argument("--block-size", type=int, default=64, help="query and key block size (default 64)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the kernel at each (warps, stages) of SWEEP and SDPA per backend (GPU only)")
    parser.add_argument("--json", help="write the report here")


def main(args) -> int:
    """Entry of `kvcache bench prefill`: run, print the table, write JSON if asked."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    contexts = [int(c) for c in args.context.split(",")] if args.context else (
        [32768, 131072, 524288] if device.type == "cuda" else [512])
    patterns = args.patterns.split(",")
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        raise SystemExit(f"unknown patterns {sorted(unknown)}; expected some of {list(PATTERNS)}")
    report = run(contexts, patterns, device, getattr(torch, args.dtype), args.iters, args.page_size, args.block_size,
                 args.sweep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m kvcache.bench.prefill", description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
