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
"""

from __future__ import annotations

import json
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
                   help="instead: perplexity and agreement of Star Attention against dense on SmolLM2-135M")
    p.add_argument("--contexts", default="4096,8000", help="--accuracy: context lengths (default 4096,8000)")
    p.add_argument("--eval-tokens", type=int, default=128, help="--accuracy: teacher-forced tokens (default 128)")
    p.add_argument("--json", help="write the report here")


def run(context: int = 32768, shard_counts: tuple[int, ...] = (1, 2, 4), steps: int = 5,
        server_threads: int = 1, baseline_threads: int | None = None) -> dict:
    """Decode-step time per shard count, the rows measured in turn step after step (so that load from other
    processes hits every row alike); returns the report."""
    import contextlib
    import os

    import torch

    from bench.timing import run_header
    from engine.star_demo import loopback_servers
    from kvcache.remote import RemoteClient
    from kvcache.sharded import ShardedClient

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
            for label, _, client, ids, _ in rows:
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
    if args.accuracy:
        counts = [int(n) for n in args.shards.split(",")]
        report = accuracy(tuple(int(n) for n in args.contexts.split(",")), counts[0], eval_tokens=args.eval_tokens,
                          extra_shards=tuple(counts[1:]))
    else:
        report = run(args.context, tuple(int(n) for n in args.shards.split(",")), args.steps, args.server_threads,
                     args.baseline_threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# ---- accuracy against dense on the real model --------------------------------------------------


def accuracy(contexts: tuple[int, ...] = (4096, 8000), shards: int = 4, anchors: tuple[str, ...] = ("1", "1/4", "1/16",
             "0"), eval_tokens: int = 128, agree_tokens: int = 32, extra_shards: tuple[int, ...] = (8,)) -> dict:
    """Star Attention against dense prefill on SmolLM2-135M, as `kvcache eval` measures methods. The text is
    the long text of the eval harness. For a context C, the first C - eval_tokens tokens are encoded (dense:
    causal prefill; Star: anchored blocks, one per shard, anchor = the given fraction of a block), then the
    last eval_tokens are teacher-forced through phase 2, scoring each next token. From there: perplexity,
    top-1 agreement with dense, and free-running greedy agreement over agree_tokens tokens decoded after the
    first of them. Shards are in-process stores (phase 2's merge over gRPC equals them, see the tests)."""
    import math

    import torch

    from bench.timing import run_header
    from engine.decode import decode_step
    from engine.eval_data import long_text
    from engine.load import load_model
    from engine.prefill import prefill
    from engine.star import StarPlan, encode_context_local
    from kvcache import InProcessClient, KVCacheConfig
    from kvcache.sharded import ShardedClient

    # One intra-op thread: with other processes on the cores, OpenMP workers spinning at barriers slow every
    # small op of a decode step by an order of magnitude.
    torch.set_num_threads(1)
    model, tok = load_model()
    c = model.config
    text_ids = tok.encode(long_text())
    report = {**run_header(torch.device("cpu")), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
              "eval_tokens": eval_tokens, "agree_tokens": agree_tokens, "rows": []}

    def store(positions: int) -> InProcessClient:
        return InProcessClient(KVCacheConfig(c.num_layers, c.num_kv_heads, c.head_dim, page_size=16, dtype="float32",
                                             device_pages=2 * (positions // 16) + 16))

    def score(client, seq: str, prefix: int, cont: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(nll [M-1], argmax [M-1]) of the forced continuation on a fork, and greedy tokens on `seq`."""
        forced = client.fork(seq).seq_id
        nll, top = [], []
        for i in range(len(cont) - 1):
            logits = decode_step(model, client, [forced], [cont[i]], [prefix + i]).logits[0]
            nll.append(-torch.log_softmax(logits, -1)[cont[i + 1]])
            top.append(int(logits.argmax()))
        client.free(forced)
        greedy, token = [], cont[0]
        for i in range(agree_tokens):
            token = int(decode_step(model, client, [seq], [token], [prefix + i]).logits[0].argmax())
            greedy.append(token)
        return torch.stack(nll), torch.tensor(top), greedy

    for C in contexts:
        prefix, cont = text_ids[: C - eval_tokens], text_ids[C - eval_tokens : C]
        t0 = time.perf_counter()
        dense = store(C + agree_tokens)
        seq = dense.create().seq_id
        prefill(model, dense, seq, prefix, chunk_size=512)
        base_nll, base_top, base_greedy = score(dense, seq, len(prefix), cont)
        base_ppl = math.exp(float(base_nll.mean()))
        print(f"context {C}: dense ppl {base_ppl:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        report["rows"].append({"context": C, "method": "dense", "perplexity": base_ppl})
        del dense
        configs = [(shards, a) for a in anchors] + [(n, "1") for n in extra_shards]
        for n, fraction in configs:
            t0 = time.perf_counter()
            b = -(-len(prefix) // n)
            num, _, den = fraction.partition("/")
            a = b * int(num) // int(den or 1)
            plan = StarPlan.make(len(prefix), n, b, a)
            with ShardedClient([store(C // n + 2 * eval_tokens + agree_tokens) for _ in range(n)]) as client:
                seq = client.create().seq_id
                encode_context_local(model, client, seq, prefix, plan, chunk_size=512)
                nll, top, greedy = score(client, seq, len(prefix), cont)
            ppl = math.exp(float(nll.mean()))
            same = next((i for i, (x, y) in enumerate(zip(greedy, base_greedy)) if x != y), len(greedy))
            row = {"context": C, "method": "star", "shards": n, "block_size": b, "anchor_size": a,
                   "anchor_fraction": fraction, "perplexity": ppl, "perplexity_vs_dense": ppl / base_ppl - 1,
                   "top1_agreement_forced": float((top == base_top).float().mean()),
                   "greedy_agreement": sum(x == y for x, y in zip(greedy, base_greedy)) / len(greedy),
                   "greedy_same_prefix": same, "seconds": time.perf_counter() - t0}
            report["rows"].append(row)
            print(f"context {C}, {n} shards, b={b}, anchor={a}: ppl {ppl:.3f} ({100 * row['perplexity_vs_dense']:+.2f}%"
                  f"), top-1 forced {100 * row['top1_agreement_forced']:.1f}%, greedy {100 * row['greedy_agreement']:.0f}%"
                  f" (same for {same} tokens) [{row['seconds']:.0f} s]", flush=True)
    return report
