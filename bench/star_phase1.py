"""`kvcache bench star-phase1`: Star Attention phase 1 (docs/sparse-attention.md §4) against one rank's full causal
prefill of the same context, same model shape (random weights), same run.

Two ways to run it:
- Parallel, one rank per device (the real thing): `python -m torch.distributed.run --standalone
  --nproc-per-node N -m kvcache.bench.star_phase1 --context 32768 --json PATH`. NCCL on GPUs (rank r on
  cuda:r), gloo on the CPU. Every rank builds the same model, then, after a barrier, encodes its
  blocks (the first alone, every other after the anchor) and appends their K/V to its own store on
  its device; phase 1 is the time from that barrier to the one after the slowest rank. Rank 0 then
  runs the baseline alone: causal prefill of the whole context into one store.
- Serial, one process (`kvcache bench star-phase1`, or without torchrun): for each N of `--ranks`,
  every rank's work is timed in turn on the one device. Phase 1 needs no communication, so the
  slowest rank's time is what N ranks with a device each would take; the report calls it
  `max_rank_seconds` and never a measured parallel time.

The encoding is kvcache.engine.star.encode_blocks (what `kvcache generate --star` runs) and the baseline is
encode_after with no prefix (plain chunked causal prefill); both use the same attention function and
chunk size, and both write to a kvcache store, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

from kvcache.engine.config import ModelConfig
from kvcache.engine.model import Llama, random_model
from kvcache.engine.star import StarPlan, encode_after, encode_blocks
from kvcache.engine.star_eval import StarSetting

# Attention shapes of real models (the weights are random: phase-1 time does not depend on them).
SHAPES = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                max_position_embeddings=131072, tie_word_embeddings=True),
    "tiny": ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=4096),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache bench star-phase1` (and of the torchrun entry point)."""
    p.add_argument("--context", type=int, default=32768, help="context tokens to encode (default 32768)")
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b", help=f"model shapes, of {sorted(SHAPES)}")
    p.add_argument("--ranks", default="2,4", help="serial mode: rank counts N (default 2,4); torchrun: its world")
    p.add_argument("--anchor", default="1", help="anchor size as a fraction of the block (default 1: anchor = block)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk in tokens, both sides (default 4096)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after one warm-up (median; default 3)")
    p.add_argument("--dtype", default=None, help="model and store dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="serial mode: device (default cuda if present)")
    p.add_argument("--json", help="write the report here")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _store(config: ModelConfig, positions: int, dtype: torch.dtype, device: torch.device):
    """An in-process kvcache client on `device` with room for `positions` of every layer."""
    from kvcache.clients.inprocess import InProcessClient
    from kvcache.config import KVCacheConfig

    page = 16
    return InProcessClient(KVCacheConfig(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                                         head_dim=config.head_dim, page_size=page, dtype=dtype, device=device,
                                         device_pages=-(-positions // page) + 4))


def rank_work(model: Llama, ids: Sequence[int], plan: StarPlan, rank: int, client, chunk: int) -> int:
    """Encode rank `rank`'s blocks of `plan` (§4 phase 1) and append them to a new sequence of `client`;
    the positions written."""
    seq = client.create().seq_id
    written = 0
    for _, k, v in encode_blocks(model, ids, plan.shard_blocks()[rank], plan.anchor_size, chunk):
        client.append(seq, k, v)
        written += k.shape[1]
    client.free(seq)
    return written


def full_prefill(model: Llama, ids: Sequence[int], client, chunk: int) -> int:
    """Causal prefill of all of `ids` into a new sequence of `client` (the one-rank baseline); positions."""
    seq = client.create().seq_id
    k, v = encode_after(model, None, None, ids, range(len(ids)), chunk)
    client.append(seq, k, v)
    client.free(seq)
    return k.shape[1]


def timed(fn: Callable[[], object], device: torch.device, repeats: int,
          barrier: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of `repeats` runs of fn after one warm-up, each between barriers with the device synced."""
    times = []
    for i in range(repeats + 1):
        _sync(device)
        barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        barrier()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _model(shape: str, dtype: torch.dtype, device: torch.device) -> Llama:
    return random_model(SHAPES[shape], seed=0, dtype=dtype, device=device)


def _ids(config: ModelConfig, n: int) -> list[int]:
    return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def _plan(context: int, ranks: int, anchor: str) -> StarPlan:
    # One block per rank, the anchor a fraction of it: the rule `kvcache eval --star` uses.
    return StarSetting(ranks, None, Fraction(anchor)).plan(context)


def serial_rows(args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The baseline and, for each N of --ranks, every rank's phase-1 work timed in turn on `device`."""
    model = _model(shape, dtype, device)
    ids = _ids(model.config, args.context)
    client = _store(model.config, args.context, dtype, device)
    base = statistics.median(timed(lambda: full_prefill(model, ids, client, args.chunk), device, args.repeats))
    rows = [{"shape": shape, "ranks": 1, "mode": "baseline", "seconds": base}]
    for n in (int(x) for x in args.ranks.split(",")):
        plan = _plan(args.context, n, args.anchor)
        per_rank = []
        for r in range(n):
            work = functools.partial(rank_work, model, ids, plan, r, client, args.chunk)
            per_rank.append(statistics.median(timed(work, device, args.repeats)))
        rows.append({"shape": shape, "ranks": n, "mode": "serial", "block": plan.block_size,
                     "anchor": plan.anchor_size, "rank_seconds": per_rank, "max_rank_seconds": max(per_rank),
                     "speedup_vs_full_prefill": base / max(per_rank)})
    return rows


def serial(args: argparse.Namespace) -> dict:
    """Every rank's phase-1 work timed in turn on one device, and the full prefill, per shape and N."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = [row for shape in args.shapes.split(",") for row in serial_rows(args, shape, device, dtype)]
    return {"mode": "serial: each rank's work timed in turn on one device; phase 1 = the slowest rank",
            "device_kind": str(device), "dtype": str(dtype).removeprefix("torch."), "rows": rows}


def parallel_row(args: argparse.Namespace, shape: str, device: torch.device, dtype: torch.dtype) -> dict | None:
    """Phase 1 with every rank of the world at once, then rank 0's full prefill; the row (on rank 0)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(shape, dtype, device)
    ids = _ids(model.config, args.context)
    client = _store(model.config, args.context, dtype, device)
    plan = _plan(args.context, world, args.anchor)
    mine: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        rank_work(model, ids, plan, rank, client, args.chunk)
        _sync(device)
        mine.append(time.perf_counter() - t0)

    star = timed(work, device, args.repeats, barrier=dist.barrier)
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, statistics.median(mine[1:]))  # mine[0] is the warm-up
    base = timed(lambda: full_prefill(model, ids, client, args.chunk), device, args.repeats) if rank == 0 else []
    dist.barrier()
    if rank:
        return None
    return {"shape": shape, "ranks": world, "mode": "parallel", "block": plan.block_size,
            "anchor": plan.anchor_size, "seconds": statistics.median(star), "runs": star,
            "rank_seconds": per_rank, "full_prefill_seconds": statistics.median(base), "full_prefill_runs": base,
            "speedup_vs_full_prefill": statistics.median(base) / statistics.median(star)}


def parallel(args: argparse.Namespace) -> dict | None:
    """Phase 1 with this torchrun world (one rank per device) and rank 0's full prefill; rank 0's report."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device) if cuda else dist.init_process_group("gloo")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    try:
        rows = [parallel_row(args, shape, device, dtype) for shape in args.shapes.split(",")]
        rank, world = dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
    if rank:
        return None
    return {"mode": f"parallel: torchrun, {world} ranks, one {device.type} device each",
            "device_kind": device.type, "dtype": str(dtype).removeprefix("torch."), "rows": rows}


def main(args: argparse.Namespace) -> int:
    """Run the serial or (under torchrun) the parallel measurement, print rows and write the JSON."""
    from kvcache.bench.timing import run_header

    under_torchrun = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    report = parallel(args) if under_torchrun else serial(args)
    if report is None:
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**run_header(device), "context": args.context, "chunk": args.chunk, "anchor_fraction": args.anchor,
              **report}
    for row in report["rows"]:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
