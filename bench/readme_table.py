"""The headline table of methods in docs/methods.md, rendered from the results files under bench/results/.

    python -m kvcache.bench.readme_table          # rewrite the table's block in docs/methods.md
    python -m kvcache.bench.readme_table --check  # exit 1 (and say so) if the block is stale

The block lies between `<!-- methods-table:start -->` and `<!-- methods-table:end -->`. Every figure in it
is read from a JSON report here (bench/results/README.md says how each was made): one headline per
method, with the file it came from. Change a figure by rerunning its benchmark, never by editing the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TABLE_FILE = REPO / "docs" / "methods.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"

# The kernels' headlines, from one `kvcache bench all --device cuda` run: decode at 128K positions x 1 sequence
# (Llama-3-8B's attention shape, pages of 16) and the MInference prefill of one layer at 128K.
HEADLINE_FILE = "headline_h100.json"
HEADLINE_CONTEXT, DECODE_BATCH = 131072, 1
ACCURACY_FILE = "eval_gate_smollm2_pre_rope.json"  # four windows pooled, 1/8 of dense bytes
STAR_FILE = "eval_star_smollm2_windows.json"


@dataclass(frozen=True)
class Headline:
    """One row: a method, what it is for, what it reads, its headline figure and the file that holds it."""

    method: str
    phase: str
    reads: str
    figure: str
    source: str | None  # a file name under bench/results/, or None (not measured)


def _load(results: pathlib.Path, name: str) -> dict:
    with open(results / name) as f:
        return json.load(f)


def card_of(report: dict) -> str:
    """"H100" from "NVIDIA H100 80GB HBM3"; the device string itself if it names no known card."""
    device = report.get("device", "")
    return next((card for card in ("H200", "H100", "A100") if card in device), device or "CPU")


def _one(rows: Sequence[dict], what: str, match: Callable[[dict], bool]) -> dict:
    found = [r for r in rows if match(r)]
    if len(found) != 1:
        raise ValueError(f"expected one row of {what}, found {len(found)}")
    return found[0]


def _decode(report: dict, source: str) -> list[Headline]:
    rows = [r for r in report["decode"]["rows"] if r["batch"] == DECODE_BATCH and r["context"] == HEADLINE_CONTEXT]
    dense = _one(rows, "dense", lambda r: r["method"] == "dense")
    where = f"{HEADLINE_CONTEXT // 1024}K x {DECODE_BATCH}, {card_of(report)}"

    def speed(method: str, params: dict, setting: str) -> str:
        row = _one(rows, f"{method} {params}", lambda r: r["method"] == method and r["params"] == params)
        share = row["bytes_read"] / dense["bytes_read"]
        return (f"{row['speedup_vs_sdpa']:.2f}x SDPA's speed at {where} ({setting}: {row['time_us']:.1f} us, "
                f"{share:.3f} of dense bytes)")

    k = HEADLINE_CONTEXT // 16  # the benchmark's k = S/16, top_pages = pages/16 and window = S/16 - 4 settings
    return [
        Headline("`dense`", "decode", "every K and V row",
                 f"{dense['speedup_vs_sdpa']:.2f}x SDPA's speed at {where} ({dense['time_us']:.1f} us; SDPA on "
                 "contiguous K/V)", source),
        Headline("`sparq`", "decode", "r key dims of every position (dim-major keys), then k whole rows",
                 speed("sparq", {"r": 16, "k": k, "local_window": k // 4}, "r=16, k=S/16"), source),
        Headline("`quest`", "decode", "page key summaries, then the pages with the highest bound",
                 speed("quest", {"top_pages": HEADLINE_CONTEXT // 16 // 16}, "pages/16"), source),
        Headline("`gate`", "decode", "the gate's page keys, then the pages it picks",
                 speed("gate", {"budget": 4096}, "budget 4096, random gate weights"), source),
        Headline("`window`", "decode", "the first `sinks` and the last `window` positions",
                 speed("window", {"window": k - 4}, "4 sinks + S/16 - 4"), source),
    ]


def _oracle(results: pathlib.Path) -> Headline:
    report = _load(results, ACCURACY_FILE)
    row = _one(report["perplexity_mean"], "oracle at 4K", lambda r: r["attention"] == "oracle" and r["context"] == 4096)
    return Headline("`oracle`", "evaluation only", "every position to choose; counts only the chosen pages' rows",
                    f"perplexity {100 * row['vs_dense']:+.2f}% vs dense at 4K reading {row['bytes_vs_dense']:.3f} of "
                    f"dense bytes (SmolLM2-135M, {row['windows']} windows pooled): the bound on page selectors",
                    ACCURACY_FILE)


def _minference(report: dict, source: str) -> Headline:
    rows = [r for r in report["prefill"]["rows"]
            if r["context"] == HEADLINE_CONTEXT and r["pattern"] == "vertical_slash"]
    best = max(rows, key=lambda r: r["speedup_vs_sdpa"])
    p = best["params"]
    causal = _one(report["prefill"]["rows"], "causal", lambda r: r["pattern"] == "causal")
    return Headline("MInference", "prefill", "per head: A-shape, vertical-slash or block-sparse key blocks",
                    f"{best['speedup_vs_sdpa']:.2f}x SDPA at a {HEADLINE_CONTEXT // 1024}K prefill, one layer, index "
                    f"included (vertical-slash {p['n_vertical']}/{p['n_slash']}, synthetic prompt, "
                    f"{card_of(report)}); the kernel over the full causal index: {causal['speedup_vs_sdpa']:.2f}x",
                    source)


def _star(results: pathlib.Path) -> Headline:
    report = _load(results, STAR_FILE)
    row = _one(report["perplexity_mean"], "star at 8K",
               lambda r: r["method"].startswith("star") and r["context"] == 8192)
    return Headline("Star Attention", "prefill + decode over servers", "each server its block; lse merge",
                    f"perplexity {100 * row['vs_dense']:+.2f}% vs dense prefill at 8K over {row['shards']} shards "
                    f"(SmolLM2-135M, {row['windows']} windows pooled)", STAR_FILE)


def headlines(results: pathlib.Path = RESULTS, headline: str | pathlib.Path = HEADLINE_FILE) -> list[Headline]:
    """The table's rows, each read from its results file (`headline`: a `kvcache bench all` report, a name under
    `results` or a path)."""
    kernels = _load(results, str(headline))
    name = pathlib.Path(headline).name
    decode_rows = _decode(kernels, name)
    return [*decode_rows[:4], _oracle(results), _minference(kernels, name), _star(results), decode_rows[4]]


def render(results: pathlib.Path = RESULTS, headline: str | pathlib.Path = HEADLINE_FILE) -> str:
    """The markdown table (no markers), links relative to docs/."""
    lines = ["| method | phase | reads | headline figure | measured in |", "| --- | --- | --- | --- | --- |"]
    for h in headlines(results, headline):
        source = f"[`{h.source}`](../bench/results/{h.source})" if h.source else "—"
        lines.append(f"| {h.method} | {h.phase} | {h.reads} | {h.figure} | {source} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """`text` with the lines between the START and END markers replaced by `table`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} block")
    head = text[: start + len(START)]
    return f"{head}\n{table}{text[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite docs/methods.md's headline table from the results files; with --check, only say whether it is stale."""
    parser = argparse.ArgumentParser(prog="python -m kvcache.bench.readme_table", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file's block differs; change nothing")
    parser.add_argument("--file", type=pathlib.Path, default=TABLE_FILE,
                        help=f"the file to update (default {TABLE_FILE})")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="the results folder")
    args = parser.parse_args(argv)
    text = args.file.read_text()
    try:
        updated = replace_block(text, render(args.results))
    except ValueError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"{args.file}: the methods table is stale; run {parser.prog}", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        args.file.write_text(updated)
        print(f"{args.file}: methods table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
