"""`make star-demo`: Star Attention over 1, 2 and 4 `kvcache serve` processes on loopback, on SmolLM2-135M.

A passkey prompt of about 1.5K tokens (a 5-digit key hidden in filler text, then the question)
is split into the context and the query (the question). Phase 1 encodes the context in one anchored block
per server with torchrun ranks (one per server, one torch thread each); phase 2 prefills the question and decodes the
answer through a ShardedClient, whose attention fans out to every server and merges by lse. For each N it
prints the answer, whether it holds the key, and the times; the servers are stopped at the end.
N = 1 is ordinary causal prefill (one block) and single-server decoding: the baseline.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

SHARD_COUNTS = (1, 2, 4)
PROMPT_TOKENS = 1536
NEW_TOKENS = 12


@contextlib.contextmanager
def loopback_servers(n: int, layers: int, kv_heads: int, head_dim: int, pages: int | Sequence[int],
                     dtype: str = "float32", threads: int = 1) -> Iterator[list[str]]:
    """Start n `kvcache serve` on free loopback ports (`pages` each, or pages[i] for server i; `threads` torch
    threads each); yields their "127.0.0.1:PORT"; stops them (SIGTERM) on exit."""
    sizes = [pages] * n if isinstance(pages, int) else list(pages)
    cmd = [sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", "--layers", str(layers), "--kv-heads",
           str(kv_heads), "--head-dim", str(head_dim), "--dtype", dtype, "--torch-threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="kvcache-star-demo-") as tmp:
        logs = [pathlib.Path(tmp, f"serve{i}.log") for i in range(n)]
        procs = []
        try:
            for log, size in zip(logs, sizes):  # the JSON log goes to a file, read back for the port: no pipe
                with open(log, "w") as f:
                    procs.append(subprocess.Popen([*cmd, "--pages", str(size)], stdout=f, stderr=subprocess.STDOUT))
            targets: list[str | None] = [None] * n
            deadline = time.monotonic() + 180
            while None in targets:
                for i, (proc, log) in enumerate(zip(procs, logs)):
                    if targets[i] is None:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"kvcache serve did not start:\n{log.read_text()}")
                        for line in log.read_text().splitlines():
                            if '"listening"' in line:
                                targets[i] = f"127.0.0.1:{json.loads(line)['port']}"
                time.sleep(0.2)
            yield [t for t in targets if t]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> int:
    """Run the demo; returns the exit code."""
    import torch

    from kvcache.clients.sharded import ShardedClient
    from kvcache.engine.eval_data import PASSKEY_QUESTION, passkey_prompt
    from kvcache.engine.load import load_model
    from kvcache.engine.star import save_model, star_generate

    # One torch thread here and in every rank: this process and the servers share a few cores, and OpenMP
    # workers spinning at barriers on busy cores slow small ops by an order of magnitude.
    torch.set_num_threads(1)
    print("loading SmolLM2-135M-Instruct from its GGUF file ...", flush=True)
    model, tok = load_model()
    c = model.config
    prompt = passkey_prompt(tok, PROMPT_TOKENS, depth=0.6, seed=7)
    n_query = len(tok.encode(PASSKEY_QUESTION))
    context, query = prompt.ids[:-n_query], prompt.ids[-n_query:]
    print(f"passkey prompt: {len(context)} context tokens (key {prompt.key} at 60% depth) + {len(query)} query "
          f"tokens: {tok.decode(query)!r}", flush=True)
    pages = -(-(len(prompt.ids) + NEW_TOKENS) // 16) + 8
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvcache-star-model-") as tmp, \
            loopback_servers(max(SHARD_COUNTS), c.num_layers, c.num_kv_heads, c.head_dim, pages) as targets:
        entry = save_model(model, pathlib.Path(tmp, "model.pt"))  # ranks map these weights, no GGUF decoding each
        print(f"{len(targets)} kvcache servers on {', '.join(targets)}\n", flush=True)
        for n in SHARD_COUNTS:
            with ShardedClient(targets[:n]) as client:
                print(f"--- N = {n}: ", end="", flush=True)
                result = star_generate(model, client, context, query, max_new_tokens=NEW_TOKENS,
                                       stop_ids=tok.stop_ids, model_entry=entry, threads_per_rank=1)
            answer = tok.decode([t for t in result.tokens if t not in tok.stop_ids])
            print(f"{answer.strip()!r}", flush=True)
            print(f"    blocks of {result.plan.block_size} (anchor {result.plan.anchor_size}), shard lengths "
                  f"{result.plan.shard_lengths()}; phase 1 {result.phase1.seconds:.1f} s wall "
                  f"({result.phase1.encode_seconds:.2f} s encoding on the slowest rank); query "
                  f"{result.query_seconds:.2f} s; decode {1000 * result.median_step_seconds:.0f} ms/step", flush=True)
            rows.append((n, answer, result))
    print(f"\n{'servers':>7} {'key found':>9} {'phase 1 s':>9} {'encode s':>8} {'query s':>7} {'ms/step':>8}")
    for n, answer, r in rows:
        print(f"{n:>7} {prompt.key in answer!s:>9} {r.phase1.seconds:>9.1f} {r.phase1.encode_seconds:>8.2f} "
              f"{r.query_seconds:>7.2f} {1000 * r.median_step_seconds:>8.0f}")
    print("(phase 1 s: the torchrun ranks' start, model mapping, encoding and appends; encode s: the slowest "
          "rank's encoding; ms/step: median decode step, all 30 layers' fan-out and lse merge included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
