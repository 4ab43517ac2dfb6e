"""`kvcache eval`: perplexity, greedy agreement and passkey retrieval of each decode method against dense,
with the attention bytes per token each one read; JSON and a plot under bench/results/."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time

import torch

from engine.cli import add_prefill_arguments
from engine.decode import AttentionSpec
from engine.eval_data import long_text, passkey_prompt
from engine.evaluation import greedy_methods, perplexity, teacher_force


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache eval`."""
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="perplexity contexts in tokens")
    p.add_argument("--eval-tokens", type=int, default=64, help="tokens scored at the end of each context")
    p.add_argument("--agree-tokens", type=int, default=32, help="free-running greedy tokens compared with dense")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8000", help="passkey prompt lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="relative depths of the key in the filler")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--sparq", default="16:8,8:16,4:32,2:64",
                   help="SparQ settings r:f with k = S/f (local window k/4): default 1/4 .. 1/32 of dense bytes")
    p.add_argument("--quest", default="4,8", help="Quest settings f with top_pages = pages/f")
    p.add_argument("--gate", help="learned page gate (a name under engine/gates/ or a path; `kvcache train-gate` makes "
                   "one): adds method gate to the grid (with --server, start the server with the same --gate)")
    p.add_argument("--gate-bytes", default="4,8", help="gate settings f: a token budget that reads 1/f of dense bytes")
    p.add_argument("--gate-pages", default="4,8", help="gate settings f: budget = pages/f (as many pages as quest f)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--server", help="host:port of a `kvcache serve` to decode through (default: in-process)")
    p.add_argument("--json", default="bench/results/eval_smollm2.json")
    p.add_argument("--plot", default="bench/results/eval_smollm2.png", help="PNG of accuracy against bytes ('' for none)")
    add_prefill_arguments(p)


def method_grid(context: int, page_size: int, sparq: str, quest: str, gate_bytes: str = "", gate_pages: str = "",
                itemsize: int = 4) -> list[tuple[str, AttentionSpec]]:
    """(label, spec) of dense and every SparQ, Quest and gate setting at a context of `context` positions."""
    grid = [("dense", AttentionSpec("dense", {}))]
    for item in filter(None, sparq.split(",")):
        r, f = (int(x) for x in item.split(":"))
        k = context // f
        grid.append((f"sparq r={r} k=S/{f}", AttentionSpec("sparq", {"r": r, "k": k, "local_window": k // 4})))
    for item in filter(None, quest.split(",")):
        f = int(item)
        pages = max(1, -(-context // page_size) // f)
        grid.append((f"quest pages/{f}", AttentionSpec("quest", {"top_pages": pages})))
    for item in filter(None, gate_bytes.split(",")):
        f = int(item)
        grid.append((f"gate bytes/{f}", AttentionSpec("gate", {"budget": gate_budget_for_bytes(context, page_size, f,
                                                                                                itemsize)})))
    for item in filter(None, gate_pages.split(",")):
        f = int(item)
        pages = max(1, -(-context // page_size) // f)
        grid.append((f"gate pages/{f}", AttentionSpec("gate", {"budget": pages * page_size})))
    return grid


def gate_budget_for_bytes(context: int, page_size: int, f: int, itemsize: int) -> int:
    """A gate token budget whose reads (three float32 summary rows per page, then 2*d*itemsize per chosen row)
    come to 1/f of dense's 2*d*itemsize per position: budget = S * (1/f - 3*4 / (2*P*itemsize)), at least 2 pages."""
    share = 1 / f - 3 * 4 / (2 * page_size * itemsize)
    return max(2 * page_size, int(context * share) // page_size * page_size)


def main(args: argparse.Namespace) -> int:
    """Run every part of the harness, print tables, write the JSON and the plot.

    With --prefill minference every measurement runs twice, after a dense prefill and after a
    MInference prefill, each in a store of its own (so neither reuses the other's cached prefix);
    both are compared with dense prefill and dense decoding.
    """
    from engine.cli import _client, prefill_attention
    from engine.load import load_model
    from engine.prefill import causal_attention

    model, tok = load_model(args.model)
    contexts = sorted((int(c) for c in args.contexts.split(",")), reverse=True)  # longest first: prefix reuse
    lengths = sorted((int(n) for n in args.passkey_lengths.split(",")), reverse=True)
    prefills = [("dense", causal_attention)]
    if args.prefill != "dense":
        prefills.append((args.prefill, prefill_attention(args, model.config)))
    clients = {name: _client(argparse.Namespace(server=args.server, token_file=None, page_size=args.page_size,
                                                kv_dtype="float32"), model.config, max(contexts + lengths) * 4)
               for name, _ in prefills}
    report: dict = {"model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)", "torch": torch.__version__,
                    "python": platform.python_version(), "command": " ".join(sys.argv), "perplexity": [],
                    "agreement": [], "passkey": []}
    if args.prefill != "dense":
        attention = prefills[1][1]
        report["prefill"] = {"method": args.prefill, "patterns": attention.patterns.model,
                             "pattern_counts": attention.patterns.counts(), "served": args.minference_served}
    if args.gate:
        from kvcache.gate_store import attach_gate

        for client in clients.values():
            if hasattr(client, "store"):  # in-process; a server holds its own (kvcache serve --gate)
                attach_gate(client.store, args.gate)
        report["gate"] = args.gate
    gate_grid = (args.gate_bytes, args.gate_pages) if args.gate else ("", "")
    text_ids = tok.encode(long_text())
    for C in contexts:
        grid = method_grid(C, args.page_size, args.sparq, args.quest, *gate_grid)
        labels, specs = [g[0] for g in grid], [g[1] for g in grid]
        M = args.eval_tokens
        base = None  # dense prefill, dense decode: (perplexity, forced argmax, free-running tokens)
        for prefill_name, attention in prefills:
            t0 = time.perf_counter()
            client = clients[prefill_name]
            before = _pairs(attention)
            run = teacher_force(model, client, text_ids[: C - M], text_ids[C - M : C], specs, attention)
            density = _density(attention, before)
            ppl = perplexity(run.nll)
            free = greedy_methods(model, client, text_ids[: C - args.agree_tokens], specs, args.agree_tokens,
                                  attention)
            if base is None:
                base = (ppl[0], run.argmax[0], free[0])
            agree = (run.argmax == base[1]).float().mean(dim=1).tolist()
            for i, label in enumerate(labels):
                name = _label(prefill_name, label)
                same = next((j for j, (a, b) in enumerate(zip(free[i], base[2])) if a != b), len(base[2]))
                row = {"context": C, "method": name, "prefill": prefill_name, **_spec(specs[i]),
                       "perplexity": ppl[i], "vs_dense": ppl[i] / base[0] - 1,
                       "bytes_per_token": run.bytes_per_token[i],
                       "bytes_vs_dense": run.bytes_per_token[i] / run.bytes_per_token[0],
                       "top1_agreement_forced": agree[i]}
                if density is not None:
                    row["prefill_density"] = density
                report["perplexity"].append(row)
                report["agreement"].append({"context": C, "method": name, "prefill": prefill_name,
                                            "greedy_tokens_equal_to_dense_until": same, "of": len(base[2])})
                print(f"ppl C={C:>5} {name:<24} {ppl[i]:8.3f} ({ppl[i] / base[0] - 1:+.2%}) bytes/token "
                      f"{run.bytes_per_token[i]:>12,.0f} ({run.bytes_per_token[i] / run.bytes_per_token[0]:.3f}x) "
                      f"top-1 agree {agree[i]:.3f}  free-run same for {same}/{len(base[2])}"
                      + ("" if density is None else f"  prefill density {density:.3f}"), flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    depths = [float(x) for x in args.depths.split(",")]
    for n in lengths:
        grid = method_grid(n, args.page_size, args.sparq, args.quest, *gate_grid)
        labels, specs = [g[0] for g in grid], [g[1] for g in grid]
        for depth in sorted(depths, reverse=True):
            for trial in range(args.trials):
                prompt = passkey_prompt(tok, n, depth, seed=hash((n, depth, trial)) % 2**31)
                for prefill_name, attention in prefills:
                    before = _pairs(attention)
                    outs = greedy_methods(model, clients[prefill_name], prompt.ids, specs, 8, attention)
                    density = _density(attention, before)
                    for label, out in zip(labels, outs):
                        answer = tok.decode(out)
                        found = re.findall(r"\d{5}", answer)
                        row = {"length": prompt.length, "depth": depth, "method": _label(prefill_name, label),
                               "prefill": prefill_name, "key": prompt.key, "answer": answer,
                               "correct": bool(found) and found[0] == prompt.key}
                        if density is not None:
                            row["prefill_density"] = density
                        report["passkey"].append(row)
                    print(f"passkey n={prompt.length} depth={depth} key={prompt.key} prefill={prefill_name}: " +
                          ", ".join(f"{lb}={'ok' if r['correct'] else 'no'}"
                                    for lb, r in zip(labels, report["passkey"][-len(labels):])), flush=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _label(prefill_name: str, label: str) -> str:
    """A method's label, prefixed by its prefill unless that is dense."""
    return label if prefill_name == "dense" else f"{prefill_name}+{label}"


def _pairs(attention) -> tuple[int, int] | None:
    """(pairs, causal pairs) a counting prefill attention has computed so far; None for dense."""
    if not hasattr(attention, "pairs"):
        return None
    return attention.pairs, attention.causal_pairs


def _density(attention, before: tuple[int, int] | None) -> float | None:
    """Share of causal pairs a counting prefill attention computed since `before` (None for dense, or if it ran
    no chunk: a prompt wholly in the prefix cache)."""
    if before is None:
        return None
    pairs, causal = attention.pairs - before[0], attention.causal_pairs - before[1]
    return round(pairs / causal, 4) if causal else None


def _spec(spec: AttentionSpec) -> dict:
    return {"attention": spec.method, "params": dict(spec.params)}


def plot(report: dict, path: str) -> None:
    """Perplexity change and passkey accuracy against attention bytes per token (relative to dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for C in sorted({r["context"] for r in report["perplexity"]}):
        rows = [r for r in report["perplexity"] if r["context"] == C and r["attention"] != "dense"]
        for attention, marker in (("sparq", "o"), ("quest", "s"), ("gate", "^")):
            pts = sorted((r["bytes_vs_dense"], 100 * r["vs_dense"]) for r in rows if r["attention"] == attention)
            if pts:
                left.plot(*zip(*pts), marker=marker, label=f"{attention} C={C}")
    left.set_xscale("log", base=2)
    left.set_xlabel("attention bytes per token / dense")
    left.set_ylabel("perplexity change vs dense (%)")
    left.axhline(0, color="gray", lw=0.5)
    left.legend(fontsize=7)
    methods = list(dict.fromkeys(r["method"] for r in report["passkey"]))
    acc = [sum(r["correct"] for r in report["passkey"] if r["method"] == m) /
           max(1, sum(1 for r in report["passkey"] if r["method"] == m)) for m in methods]
    right.barh(methods, acc)
    right.set_xlabel("passkey accuracy (all lengths and depths)")
    right.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
