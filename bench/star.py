"""`kvcache bench star`: Star Attention phase 2 on loopback. The time of a decode step against the number
of shards that hold the context.

The model shape is SmolLM2-135M's (30 layers, 9 q / 3 kv heads, d=64). The store is float16 with
synthetic K/V, and `--context` positions are split evenly over N `kvcache serve` processes with
`--server-threads` torch threads each (default 1). One decode step makes one ShardedClient.attend call
per layer. Each call carries the new token's q, k and v, fans out to the N shards at once, and merges
their (out, lse) by §4; the new K/V go to the last shard. There are two baselines. The first is one
server with `--baseline-threads` threads (default: every core) holding the whole context and decoded
through a plain RemoteClient. The second is the 1-shard sequence, also read through a RemoteClient,
which shows what the sharding layer itself costs. All rows are filled first and then measured in
turn, one step each per round, so load from other processes on a shared machine hits every row
alike; medians are reported.

`--accuracy` runs the accuracy harness's Star Attention path instead (`kvcache eval --star`,
engine/star_eval.py): perplexity and greedy agreement against dense prefill on SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SHAPE = {"num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}


def add_arguments(p) -> None:
    """The flags of `kvcache bench star`."""
    p.add_argument("--context", type=int, default=32768, help="cached positions, split over the shards (32768)")
    p.add_argument("--shards", default="1,2,4", help="comma-separated shard counts (default 1,2,4)")
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per row (median reported; default 5)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of each shard server (default 1)")
    p.add_argument("--baseline-threads", type=int,
                   help="torch threads of an extra single server holding the whole context (default: the CPU count)")
    p.add_argument("--accuracy", action="store_true",
                   help="instead: perplexity and greedy agreement of Star Attention against dense on SmolLM2-135M, "
                   "every --shards x --anchors setting (`kvcache eval --star` without passkey)")
    p.add_argument("--contexts", default="4096,8000", help="--accuracy: context lengths (default 4096,8000)")
    p.add_argument("--anchors", default="1,1/4,1/16,0",
                   help="--accuracy: anchors as fractions of the block (default 1,1/4,1/16,0)")
    p.add_argument("--eval-tokens", type=int, default=128, help="--accuracy: teacher-forced tokens (default 128)")
    p.add_argument("--json", help="write the report here")


def run(context: int = 32768, shard_counts: tuple[int, ...] = (1, 2, 4), steps: int = 5,
        server_threads: int = 1, baseline_threads: int | None = None) -> dict:
    """Decode-step time per shard count, the rows measured in turn step after step (so that load from other
    processes hits every row alike); returns the report."""
    import contextlib
    import os

    import torch

    from kvcache.bench.timing import run_header
    from kvcache.clients.remote import RemoteClient
    from kvcache.clients.sharded import ShardedClient
    from kvcache.engine.star_demo import loopback_servers

    torch.set_num_threads(1)  # the client only merges; the servers do the attention
    P = 16
    baseline_threads = baseline_threads or os.cpu_count() or 1
    most = max(shard_counts)
    # Server i holds a shard of every row with more than i shards.
    pages = [sum(-(-context // n) // P + steps + 8 for n in shard_counts if n > i) + 8 for i in range(most)]
    report = {**run_header(torch.device("cpu")), "shape": SHAPE, "context": context, "dtype": "float16",
              "steps": steps, "server_threads": server_threads, "baseline_threads": baseline_threads,
              "cpu_count": os.cpu_count(), "rows": []}
    gen = torch.Generator().manual_seed(0)
    chunk = 1024
    shape = (SHAPE["num_layers"], chunk, SHAPE["num_kv_heads"], SHAPE["head_dim"])
    block_k, block_v = torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half()
    q = torch.randn((1, SHAPE["num_q_heads"], SHAPE["head_dim"]), generator=gen).half()
    new = torch.randn((2, 1, SHAPE["num_kv_heads"], SHAPE["head_dim"]), generator=gen).half()

    def fill(client, seq: str) -> None:
        for s in range(0, context, chunk):
            m = min(chunk, context - s)
            client.append(seq, block_k[:, :m], block_v[:, :m])

    with contextlib.ExitStack() as stack:
        shape_args = (SHAPE["num_layers"], SHAPE["num_kv_heads"], SHAPE["head_dim"])
        targets = stack.enter_context(loopback_servers(most, *shape_args, pages, "float16", server_threads))
        rows = []  # (label, shards, client, seq ids)
        if baseline_threads != server_threads:
            (alone,) = stack.enter_context(loopback_servers(1, *shape_args, context // P + steps + 16, "float16",
                                                            baseline_threads))
            remote = stack.enter_context(RemoteClient(alone, timeout=300))
            seq = remote.create().seq_id
            fill(remote, seq)
            rows.append((f"1 server, {baseline_threads} threads", 1, remote, [seq], [context]))
        print(f"{most} servers with {server_threads} torch thread(s) each: {', '.join(targets)}; context {context}, "
              f"float16, SmolLM2-135M shape", flush=True)
        for n in shard_counts:
            client = stack.enter_context(ShardedClient(targets[:n], block_size=-(-context // n), timeout=300))
            seq = client.create().seq_id
            fill(client, seq)
            if n == 1:
                remote = stack.enter_context(RemoteClient(targets[0], timeout=300))
                rows.append((f"1 server, {server_threads} thread(s), RemoteClient", 1, remote, client.sub_ids(seq),
                             client.shard_lengths(seq)))
            rows.append((f"{n} server(s) x {server_threads} thread(s), ShardedClient", n, client, [seq],
                         client.shard_lengths(seq)))
        times: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label, *_ in rows}
        for step in range(steps + 1):  # the first round warms up every row
            # The order rotates each round, so no row always follows the same one: slow drifts of
            # a shared machine then fall on every row alike.
            for label, _, client, ids, _ in rows[step % len(rows):] + rows[: step % len(rows)]:
                layer_t, step_t = _steps(client, ids, q, new, 1)
                if step:
                    times[label][0].extend(layer_t)
                    times[label][1].extend(step_t)
        print(f"{'rows (measured in turn)':<48} {'positions/shard':>15} {'layer call ms':>13} {'step ms':>9} "
              f"{'vs first':>8}")
        first = None
        for label, n, _, _, lengths in rows:
            layer_t, step_t = times[label]
            row = {"label": label, "shards": n, "positions_per_shard": lengths,
                   "layer_call_ms": 1e3 * statistics.median(layer_t), "step_ms": 1e3 * statistics.median(step_t),
                   "step_ms_all": [round(1e3 * t, 1) for t in step_t]}
            first = first or row["step_ms"]
            row["speedup_vs_first_row"] = first / row["step_ms"]
            report["rows"].append(row)
            print(f"{label:<48} {max(lengths):>15} {row['layer_call_ms']:>13.2f} {row['step_ms']:>9.1f} "
                  f"{row['speedup_vs_first_row']:>7.2f}x", flush=True)
    return report


def _steps(client, seq_ids: list[str], q, new, steps: int) -> tuple[list[float], list[float]]:
    """`steps` decode steps of one sequence: per layer one attend with the new token's q, k, v."""
    layer_t, step_t = [], []
    for _ in range(steps):
        t_step = time.perf_counter()
        for layer in range(SHAPE["num_layers"]):
            t = time.perf_counter()
            client.attend(seq_ids, layer, q, "dense", new_k=new[0], new_v=new[1])
            layer_t.append(time.perf_counter() - t)
        step_t.append(time.perf_counter() - t_step)
    return layer_t, step_t


def main(args) -> int:
    """Entry of `kvcache bench star`."""
    if args.accuracy:  # the eval harness measures it (engine/star_eval.py), JSON included
        import torch

        from kvcache.engine.eval_cli import main as eval_main

        torch.set_num_threads(1)  # other processes on the cores: spinning OpenMP workers slow small ops
        return eval_main(accuracy_arguments(args))
    report = run(args.context, tuple(int(n) for n in args.shards.split(",")), args.steps, args.server_threads,
                 args.baseline_threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# ---- accuracy against dense on the real model --------------------------------------------------


def accuracy_arguments(args) -> argparse.Namespace:
    """The `kvcache eval --star` flags that `bench star --accuracy` stands for: perplexity and greedy agreement (no
    passkey, no sparse decode methods) of every --shards x --anchors setting, one block per shard."""
    from kvcache.engine.eval_cli import add_arguments as add_eval_arguments

    parser = argparse.ArgumentParser(prog="kvcache eval")
    add_eval_arguments(parser)
    return parser.parse_args([
        "--star", "--shards", args.shards, "--star-anchors", args.anchors, "--contexts", args.contexts,
        "--eval-tokens", str(args.eval_tokens), "--passkey-lengths", "", "--sparq", "", "--quest", "",
        "--json", args.json or os.devnull, "--plot", ""])
