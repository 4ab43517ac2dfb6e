"""`kvcache bench restart`: time to first token of a repeated long prompt after a server restart, with a persistent
disk tier (`--disk-dir`) and without.

SmolLM2-135M on the CPU, decoding through a `kvcache serve` subprocess of its shape. `--repeats` different prompts
(slices of one text) are each sent once to: a fresh server (cold: the whole prompt is computed); the same server
again (its prefix cache, on the device); a server restarted on the same `--disk-dir` after a clean stop (the prefix
pages copied down at the stop, read from the disk tier); one restarted on it after SIGKILL (the pages that had
reached the disk); and a server restarted without a persistent disk tier (cold again). Time to first token is the
prefill's wall time, as `generate` measures it (with a cached prefix the engine reads the cached rows back and
computes the rest), median over the prompts.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import torch

from kvcache.bench.server_process import ServerProcess
from kvcache.bench.timing import run_header, write_report

STORE = ["--layers", "30", "--kv-heads", "3", "--head-dim", "64", "--page-size", "16", "--dtype", "float32"]


def _prompts(tokenizer, tokens: int, count: int) -> list[list[int]]:
    """`count` prompts of `tokens` token ids, disjoint slices of Python's own documentation (shipped with it)."""
    from pydoc_data.topics import topics

    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))
    if len(ids) < tokens * count:
        raise ValueError(f"the text holds {len(ids)} tokens; {count} prompts of {tokens} need more")
    return [ids[i * tokens : (i + 1) * tokens] for i in range(count)]


def run(tokens: int, repeats: int, device_pages: int, disk_pages: int) -> dict:
    """The five cases; returns the JSON-ready report."""
    from kvcache import RemoteClient
    from kvcache.engine.generate import generate
    from kvcache.engine.load import load_model

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model, tokenizer = load_model()
    prompts = _prompts(tokenizer, tokens, repeats)
    work = tempfile.mkdtemp(prefix="kvcache-restart-")
    log = os.path.join(work, "serve.log")
    disk_dir = os.path.join(work, "disk")
    os.mkdir(disk_dir)
    flags = [*STORE, "--pages", str(device_pages), "--disk-pages", str(disk_pages), "--torch-threads", "1"]
    persistent = [*flags, "--disk-dir", disk_dir]
    report: dict = {**run_header(torch.device("cpu")), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
                    "prompt_tokens": tokens, "prompts": repeats, "device_pages": device_pages,
                    "disk_pages": disk_pages, "cases": []}

    def ttft(server: ServerProcess, case: str) -> None:
        times, reused = [], []
        with RemoteClient(server.target, timeout=600) as client:
            for ids in prompts:
                result = generate(model, client, [ids], max_new_tokens=1)
                times.append(result.prefill_seconds)
                reused.append(result.reused_tokens)
            pool = client.stats()["pool"]
        row = {"case": case, "ttft_s": statistics.median(times), "ttft_all_s": times, "reused_tokens": reused,
               "pages_restored": pool.get("pages_restored", 0)}
        report["cases"].append(row)
        print(f"{case:<44} TTFT {row['ttft_s']:7.3f} s  reused {reused[0]:>5} of {tokens} tokens  "
              f"restored pages {row['pages_restored']}")

    server = ServerProcess(persistent, log)
    ttft(server, "first prompt (cold)")
    ttft(server, "same server, prefix cached")
    server.stop()
    server = ServerProcess(persistent, log)
    ttft(server, "restarted on --disk-dir after a clean stop")
    server.stop(kill=True)
    server = ServerProcess(persistent, log)
    ttft(server, "restarted on --disk-dir after SIGKILL")
    server.stop()
    server = ServerProcess(flags, log)
    ttft(server, "restarted without --disk-dir")
    server.stop()
    cold = report["cases"][0]["ttft_s"]
    for row in report["cases"]:
        row["speedup_vs_cold"] = cold / row["ttft_s"]
    return report


def main(args) -> int:
    """Entry of `kvcache bench restart`."""
    report = run(args.tokens, args.repeats, args.pages, args.disk_pages)
    write_report(report, args.json)
    return 0


def add_arguments(p) -> None:
    """Flags of `kvcache bench restart`."""
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--repeats", type=int, default=3, help="different prompts, each sent once per case; median "
                   "reported (default 3)")
    p.add_argument("--pages", type=int, default=512, help="device pages of the server (default 512)")
    p.add_argument("--disk-pages", type=int, default=1024, help="disk-tier pages (default 1024)")
    p.add_argument("--json", help="write the report here")
