"""`kvcache bench all`: the benchmarks behind the headline table of docs/methods.md, in one run.

On a GPU (minutes): decode attention of every servable method at 128K positions x 1 sequence (Llama-3-8B's
attention shape, bfloat16, pages of 16) against SDPA on contiguous K/V, and the MInference prefill of one layer at
128K against causal SDPA. Writes bench/results/headline_<card>.json (both reports, the device and versions, the
command) and prints that table as kvcache.bench.readme_table renders it from that file; the accuracy rows
come from `kvcache eval` reports (CPU, the SmolLM2 weights), which this command does not run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

from kvcache.bench import decode, prefill
from kvcache.bench.readme_table import HEADLINE_CONTEXT, RESULTS, card_of, render
from kvcache.bench.timing import run_header

DECODE_METHODS = ["dense", "sparq", "quest", "gate", "window"]
PREFILL_PATTERNS = ["causal", "vertical_slash"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kvcache bench all`."""
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available; the CPU runs a small context)")
    parser.add_argument("--context", type=int, help=f"positions (default {HEADLINE_CONTEXT} on a GPU, 4096 on a CPU)")
    parser.add_argument("--iters", type=int, default=30, help="timed runs per decode row (median reported)")
    parser.add_argument("--json", help="where to write the report (default bench/results/headline_<card>.json)")


def main(args: argparse.Namespace) -> int:
    """Run the decode and prefill benchmarks of the headline table; write the report; print the table."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    context = args.context or (HEADLINE_CONTEXT if device.type == "cuda" else 4096)
    t0 = time.perf_counter()
    report = {**run_header(device), "context": context}
    report["decode"] = decode.run([context], [1], DECODE_METHODS, device, iters=args.iters)
    if device.type == "cuda":  # the sparse prefill kernel's timing means something on a GPU only
        report["prefill"] = prefill.run([context], PREFILL_PATTERNS, device, torch.bfloat16, iters=3, page_size=16,
                                        block_size=64)
    report["seconds"] = time.perf_counter() - t0
    out = pathlib.Path(args.json or RESULTS / f"headline_{card_of(report).lower()}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    if context == HEADLINE_CONTEXT and "prefill" in report:
        print(render(RESULTS, out.resolve()))
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m kvcache.bench.all", description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
