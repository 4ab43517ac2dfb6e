"""`kvcache eval`: perplexity, greedy agreement and passkey retrieval of each decode method against dense,
with the attention bytes per token each one read; JSON and a plot under bench/results/.

Perplexity is scored on the evaluation text (engine/eval_data.py: stdlib docstrings), never on the calibration text
that gates and prefill patterns are fitted to. With several windows per context the rows are pooled with bootstrap
intervals over windows (engine/eval_stats.py); `--heldout` is the setting to report: 16 disjoint windows spread over
the text, and StreamingLLM's window at each method's bytes as the floor a method must beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from kvcache.config import KVCacheConfig
from kvcache.engine import eval_stats
from kvcache.engine.cli import add_prefill_arguments
from kvcache.engine.decode import AttentionSpec, parse_layers
from kvcache.engine.eval_data import CALIBRATION_SOURCE, EVALUATION_SOURCE, evaluation_text, passkey_prompt
from kvcache.engine.evaluation import Encoder, greedy_methods, perplexity, teacher_force
from kvcache.engine.prefill import PrefillAttention, causal_attention
from kvcache.engine.ruler import ruler_agreement, ruler_suite
from kvcache.engine.ruler import summarize as ruler_summary
from kvcache.engine.star_eval import StarEncoder, parse_settings, shard_clients
from kvcache.errors import InvalidParameter
from kvcache.methods.base import AttentionMethod
from kvcache.methods.byte_allocation import ByteAllocation, load_allocation
from kvcache.methods.byte_budget import least_share
from kvcache.methods.gate import gate_budget_for_share
from kvcache.methods.gate_model import GATE_DIM
from kvcache.methods.gate_store import load_gate
from kvcache.methods.quest import quest_pages_for_share
from kvcache.methods.registry import METHODS

HELDOUT_WINDOWS = 16  # --heldout's windows per context
EQUAL_BYTES = 0.1  # a floor row within this relative difference of a method's bytes reads "equal bytes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache eval`."""
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="perplexity contexts in tokens")
    p.add_argument("--eval-tokens", type=int, default=64, help="tokens scored at the end of each context")
    p.add_argument("--heldout", action="store_true",
                   help=f"the evaluation to report: {HELDOUT_WINDOWS} disjoint windows per context spread over the "
                        "evaluation text (unless --windows/--window-stride say otherwise), the window floor rows "
                        "(--floor auto) and bootstrap intervals")
    p.add_argument("--windows", type=int, default=None,
                   help="text windows per context, starting --window-stride tokens apart; with more than one, "
                        "perplexity_mean pools them with bootstrap intervals (one window is one stretch of text, not "
                        f"an average) (default 1; {HELDOUT_WINDOWS} with --heldout)")
    p.add_argument("--window-stride", type=int, default=0,
                   help="tokens between window starts (default: the context; with --heldout the text's tokens / "
                        "windows, at least the context)")
    p.add_argument("--floor", default=None,
                   help="StreamingLLM window rows (sinks + recent window) to compare every method with at equal bytes: "
                        "auto = one at each other row's bytes at each context, or f,... = window rows reading 1/f "
                        "of dense bytes, or '' for none (default: auto with --heldout, else none)")
    p.add_argument("--bootstrap", type=int, default=eval_stats.RESAMPLES,
                   help="bootstrap resamples of the windows for the intervals (default %(default)s)")
    p.add_argument("--bootstrap-seed", type=int, default=eval_stats.SEED,
                   help="seed of the bootstrap draws (default %(default)s): every method is resampled alike")
    p.add_argument("--agree-tokens", type=int, default=32, help="free-running greedy tokens compared with dense")
    p.add_argument("--passkey-lengths", default="1024,2048,4096,8000", help="passkey prompt lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="relative depths of the key in the filler")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--ruler-lengths", default="",
                   help="lengths in tokens of the RULER-style suite (engine/ruler.py: single and multi-key needle, "
                        "multi-value, variable tracking), scored as agreement with dense's answers ('' for none)")
    p.add_argument("--ruler-items", type=int, default=4, help="RULER-style items per task and length")
    p.add_argument("--ruler-seed", type=int, default=0, help="seed of the RULER-style items")
    p.add_argument("--sparq", default="16:8,8:16,4:32,2:64",
                   help="SparQ settings r:f with k = S/f (local window k/4): default 1/4 .. 1/32 of dense bytes")
    p.add_argument("--quest", default="4,8", help="Quest settings f with top_pages = pages/f")
    p.add_argument("--quest-bytes", default="", help="Quest settings f: top_pages that read 1/f of dense bytes "
                                                       "(summaries included), to compare with gate bytes/f")
    p.add_argument("--gate", help="learned page gate (a name under kvcache/methods/gates/ or a path; "
                   "`kvcache train-gate` makes "
                   "one): adds method gate to the grid (with --server, start the server with the same --gate)")
    p.add_argument("--gate-bytes", default="4,8", help="gate settings f: a token budget that reads 1/f of dense bytes")
    p.add_argument("--gate-pages", default="4,8", help="gate settings f: budget = pages/f (as many pages as quest f)")
    p.add_argument("--gate-threshold", default="",
                   help="gate settings by probability threshold, no budget: T (e.g. 0.01), or c/n for T = c over the "
                        "pages between the first and the last at that context (the pages at least c times as likely "
                        "as a uniform gate's); each step reads a data-dependent number of pages, counted")
    p.add_argument("--oracle-bytes", default="",
                   help="oracle settings f: the pages with the most true attention mass (kvcache.methods.oracle), "
                        "as many as gate bytes/f reads: the bound on any page selector at that budget")
    p.add_argument("--gate-dense-layers", default="",
                   help="layers (e.g. 7 or 4-7,12) that read every page: each gate bytes/f setting gets a row that "
                        "runs dense there and the gate elsewhere, its budget lowered so the whole still reads 1/f")
    p.add_argument("--gate-oracle-layers", default="",
                   help="diagnostic: each gate bytes/f setting gets a row whose choice in these layers is the "
                        "oracle's, at the same budget (which layers' gate choices cost the perplexity)")
    p.add_argument("--oracle-share", default="",
                   help="oracle settings by the share of K/V rows read (budget = share x context, whole pages), with "
                        "no scoring cost: the bound on any page selector reading that many rows, at any --page-size")
    p.add_argument("--at-bytes", default="",
                   help="METHOD:f,...: any method with the parameters that read 1/f of dense bytes at each context "
                        "(AttentionMethod.params_for_share; f >= 1, not necessarily whole), e.g. window:8,sparq:6.5")
    p.add_argument("--allocation",
                   help="a byte allocation (`kvcache calibrate-bytes`; a name under kvcache/methods/allocations/ or "
                        "a path): each --at-bytes METHOD:f row gets a twin spending the same mean share per layer "
                        "by it")
    p.add_argument("--min-coverage", default="",
                   help="values c,...: every sparse --at-bytes row (and its calibrated twin) again with "
                        "min_coverage=c, a sequence's layer read densely when its coverage estimate is below c "
                        "(the bytes counted)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--server", help="host:port of a `kvcache serve` to decode through (default: in-process)")
    p.add_argument("--star", action="store_true",
                   help="also Star Attention (docs/sparse-attention.md §4): the context encoded in "
                   "anchored blocks over --shards shards, the query and every later token by lse-merged attention over "
                   "them (dense decoding), against dense prefill")
    p.add_argument("--shards", default="4", help="--star: comma-separated shard counts (default 4)")
    p.add_argument("--star-blocks", default="auto",
                   help="--star: block sizes in tokens, or auto = one block per shard (default auto)")
    p.add_argument("--star-anchors", default="1,1/4",
                   help="--star: anchor sizes as fractions of the block, e.g. 1,1/4,1/16,0 (default 1,1/4)")
    p.add_argument("--star-query-tokens", type=int, default=1,
                   help="--star: last tokens of a text prompt that phase 2 encodes as the query (passkey prompts: "
                   "the question) (default 1)")
    p.add_argument("--star-servers", help="--star: host:port,... of `kvcache serve` processes to hold the shards "
                   "(the first N for N shards; default: in-process stores)")
    p.add_argument("--json", default="bench/results/eval_smollm2.json")
    p.add_argument("--plot", default="bench/results/eval_smollm2.png",
                   help="PNG of accuracy against bytes ('' for none)")
    add_prefill_arguments(p)


def gate_threshold_at(setting: str, context: int, page_size: int) -> float:
    """The gate threshold (a probability) of an eval setting at `context` tokens: "T" as is, "c/n" as c over the
    pages between the first and the last."""
    text = setting.strip()
    if text.endswith("/n"):
        middle = max(1, -(-context // page_size) - 2)
        threshold = float(text[:-2]) / middle
    else:
        threshold = float(text)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"gate threshold {setting!r} at {context} tokens is {threshold:.4g}, not in [0, 1]")
    return threshold


def method_grid(context: int, page_size: int, sparq: str, quest: str, gate_bytes: str = "", gate_pages: str = "",
                itemsize: int = 4, head_dim: int = 64, gate_dim: int = GATE_DIM,
                quest_bytes: str = "", oracle_bytes: str = "",
                gate_threshold: str = "", oracle_share: str = "", gate_dense_layers: str = "",
                gate_oracle_layers: str = "", num_layers: int | None = None,
                at_bytes: str = "", allocation: ByteAllocation | None = None,
                min_coverage: str = "") -> list[tuple[str, AttentionSpec]]:
    """(label, spec) of dense and every SparQ, Quest, gate and oracle setting at a context of `context` positions
    (a store of `itemsize`-byte K/V of `head_dim`; gate keys of `gate_dim` in the same dtype; `num_layers` layers,
    needed for the per-layer gate rows)."""
    grid = [("dense", AttentionSpec("dense", {}))]
    for item in filter(None, sparq.split(",")):
        r, f = (int(x) for x in item.split(":"))
        k = context // f
        grid.append((f"sparq r={r} k=S/{f}", AttentionSpec("sparq", {"r": r, "k": k, "local_window": k // 4})))
    for item in filter(None, quest.split(",")):
        f = int(item)
        pages = max(1, -(-context // page_size) // f)
        grid.append((f"quest pages/{f}", AttentionSpec("quest", {"top_pages": pages})))
    for item in filter(None, quest_bytes.split(",")):
        f = int(item)
        pages = quest_pages_for_share(context, page_size, 1 / f, head_dim, itemsize)
        grid.append((f"quest bytes/{f}", AttentionSpec("quest", {"top_pages": pages})))
    dense_at = parse_layers(gate_dense_layers, num_layers)
    oracle_at = parse_layers(gate_oracle_layers, num_layers)
    for item in filter(None, gate_bytes.split(",")):
        f = int(item)
        budget = gate_budget_for_share(context, page_size, 1 / f, head_dim, itemsize, gate_dim, itemsize)
        grid.append((f"gate bytes/{f}", AttentionSpec("gate", {"budget": budget})))
        if oracle_at:
            oracle = ("oracle", {"budget": budget})
            grid.append((f"gate bytes/{f} oracle@{gate_oracle_layers.strip()}",
                         AttentionSpec("gate", {"budget": budget}, dict.fromkeys(oracle_at, oracle))))
        if dense_at:
            # Dense layers read all their bytes: the gate layers share what is left of L/f layers' worth.
            rest = (num_layers / f - len(dense_at)) / (num_layers - len(dense_at)) if num_layers > len(dense_at) else 0
            if rest <= 0:
                raise ValueError(f"{len(dense_at)} dense layers of {num_layers} read more than 1/{f} of dense bytes")
            lowered = gate_budget_for_share(context, page_size, rest, head_dim, itemsize, gate_dim, itemsize)
            grid.append((f"gate bytes/{f} dense@{gate_dense_layers.strip()}",
                         AttentionSpec("gate", {"budget": lowered}, dict.fromkeys(dense_at, ("dense", {})))))
    for item in filter(None, gate_pages.split(",")):
        f = int(item)
        pages = max(1, -(-context // page_size) // f)
        grid.append((f"gate pages/{f}", AttentionSpec("gate", {"budget": pages * page_size})))
    for item in filter(None, gate_threshold.split(",")):
        threshold = gate_threshold_at(item, context, page_size)
        grid.append((f"gate thr={item.strip()}", AttentionSpec("gate", {"threshold": threshold})))
    for item in filter(None, oracle_bytes.split(",")):
        f = int(item)  # the pages gate bytes/f reads, chosen by true attention mass
        budget = gate_budget_for_share(context, page_size, 1 / f, head_dim, itemsize, gate_dim, itemsize)
        grid.append((f"oracle bytes/{f}", AttentionSpec("oracle", {"budget": budget})))
    for item in filter(None, oracle_share.split(",")):
        share = float(item)
        if not 0 < share <= 1:
            raise ValueError(f"an oracle share is in (0, 1]; got {item}")
        budget = gate_budget_for_share(context, page_size, share, head_dim, itemsize, 0, itemsize)  # no gate keys
        grid.append((f"oracle share={item.strip()}", AttentionSpec("oracle", {"budget": budget})))
    for item in filter(None, at_bytes.split(",")):
        name, _, f = item.strip().partition(":")
        try:
            share = 1 / float(f) if float(f) >= 1 else 0.0
        except ValueError:
            share = 0.0
        if name not in METHODS or not share:
            raise ValueError(f"--at-bytes takes METHOD:f with a known method and a number f >= 1; got {item!r}")
        params = METHODS[name].params_for_share(context, share, page_size, head_dim, itemsize)
        if params is None:
            raise ValueError(f"{name} has no parameters that read 1/{f} of dense bytes at {context} tokens")
        grid.append((f"{name} bytes/{f}", AttentionSpec(name, params.given())))
        if allocation is not None:  # the same mean share, spent per layer by the calibrated allocation
            grid.append((f"{name} bytes/{f} calibrated", calibrated_spec(METHODS[name], context, share,
                                                                           page_size, head_dim, itemsize,
                                                                           allocation)))
    budget_rows = [(label, spec) for label, spec in grid if " bytes/" in label and spec.method != "window"]
    for value in filter(None, (x.strip() for x in min_coverage.split(","))):
        # Each sparse --at-bytes row again, a sequence's layer read densely where its coverage is below `value`.
        for label, spec in budget_rows:
            layers = {layer: (m, {**p, "min_coverage": float(value)}) for layer, (m, p) in spec.layers.items()}
            grid.append((f"{label} cov>={value}", AttentionSpec(spec.method, {**spec.params, "min_coverage":
                                                                              float(value)}, layers)))
    return grid


def nominal_share(spec: AttentionSpec, context: int, config: KVCacheConfig) -> float | None:
    """The share of dense attention's bytes a grid row reads at `context` positions by its method's formula; None
    where the formula does not say (a gate by threshold reads what the data asks, a row with per-layer methods)."""
    if spec.layers or (spec.method == "gate" and spec.params.get("threshold") is not None):
        return None
    method, dense = METHODS[spec.method], METHODS["dense"]
    try:
        return method.bytes_read(config, [context], method.parse(spec.params)) / dense.bytes_read(
            config, [context], dense.parse({}))
    except (InvalidParameter, ValueError):  # no formula for these parameters at this length
        return None


def floor_grid(grid: list[tuple[str, AttentionSpec]], context: int, config: KVCacheConfig, floor: str,
               length: int | None = None) -> list[tuple[str, AttentionSpec]]:
    """StreamingLLM window rows (4 sinks and a recent window) that `grid` lacks: with floor "auto" one at each
    row's nominal share of dense bytes at `length` cached positions (default `context`; the middle of the scored
    tokens reads what the steps read on average), reading that share of them; with "f,..." one at 1/f of dense
    bytes at `context` (the same as --at-bytes window:f); with "" none."""
    window = METHODS["window"]
    have = {window.parse(s.params) for _, s in grid if s.method == "window" and not s.layers}
    rows: list[tuple[str, AttentionSpec]] = []

    def add(label: str, params: dict) -> None:
        if window.parse(params) not in have:  # a window row the grid has already (--at-bytes window:f)
            have.add(window.parse(params))
            rows.append((label, AttentionSpec("window", params)))

    if floor.strip() == "auto":
        at = length or context
        shares = (nominal_share(spec, at, config) for _, spec in grid if spec.method not in ("dense", "window"))
        kept: list[float] = []
        for share in sorted({s for s in shares if s is not None and s < 1}, reverse=True):
            if kept and share > kept[-1] * (1 - EQUAL_BYTES / 2):  # one floor row serves shares this close
                continue
            kept.append(share)
            total = round(share * at)  # positions read: sinks + window
            sinks = min(4, total - 1)
            if sinks >= 0:
                add(f"window floor {share:.3g}", {"window": total - sinks, "sinks": sinks})
        return rows
    for item in filter(None, (x.strip() for x in floor.split(","))):
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--floor takes auto or integers f >= 1; got {item!r}")
        params = window.params_for_share(context, 1 / int(item), config.page_size, config.head_dim, config.itemsize)
        if params is None:
            raise ValueError(f"window has no parameters that read 1/{item} of dense bytes at {context} tokens")
        add(f"window bytes/{item}", params.given())
    return rows


def calibrated_spec(m: AttentionMethod, context: int, share: float, page_size: int, head_dim: int, itemsize: int,
                    allocation: ByteAllocation) -> AttentionSpec:
    """Method `m` reading a mean `share` of dense bytes at `context` positions, each layer its allocation's share."""
    floor = least_share(m, context, page_size, head_dim, itemsize)
    layers = {}
    for layer, s in enumerate(allocation.shares(share, floor)):
        p = m.params_for_share(context, s, page_size, head_dim, itemsize)
        if p is None:
            raise ValueError(f"{m.name} has no parameters that read {s:.4g} of dense bytes at {context} tokens")
        layers[layer] = (m.name, p.given())
    return AttentionSpec(m.name, layers[0][1], layers)


@dataclass
class Encoding:
    """One way the harness puts a prompt into a store: a prefill attention (dense causal, or MInference), or
    Star Attention's two phases (`star`), whose rows decode densely over the shards."""

    name: str  # "dense", the --prefill method, or a Star setting's label
    client: Any
    attention: PrefillAttention = causal_attention
    star: StarEncoder | None = None

    @property
    def kind(self) -> str:
        """The rows' "prefill" field."""
        return "star" if self.star is not None else self.name

    def grid(self, grid: list[tuple[str, AttentionSpec]]) -> list[tuple[str, AttentionSpec]]:
        """The decode methods this encoding runs: all, or only dense for Star (its phase 2 is dense attention)."""
        return grid if self.star is None else [g for g in grid if g[1].method == "dense"]

    def label(self, method_label: str) -> str:
        """A row's method name: the decode method's label, prefixed by a non-dense prefill; a Star setting's label."""
        if self.star is not None:
            return self.name
        return method_label if self.name == "dense" else f"{self.name}+{method_label}"

    def encoder(self, query_tokens: int | None = None) -> Encoder | None:
        """The harness's Encoder (None: prefill by `attention`), with `query_tokens` as the Star query if given."""
        if self.star is None or query_tokens is None:
            return self.star
        return dataclasses.replace(self.star, query_tokens=query_tokens)

    def fields(self, prompt_len: int, query_tokens: int | None = None) -> dict:
        """Extra JSON fields of a row (Star's plan) for a `prompt_len`-token prompt."""
        encoder = self.encoder(query_tokens)
        return {} if encoder is None else encoder.row(prompt_len)


def encodings(args: argparse.Namespace, model, positions: int) -> list[Encoding]:
    """Dense prefill first (every row's baseline), then --prefill's method, then each --star setting."""
    from kvcache.engine.cli import _client, prefill_attention

    def store():
        return _client(argparse.Namespace(server=args.server, token_file=None, page_size=args.page_size,
                                          kv_dtype="float32"), model.config, 4 * positions)

    out = [Encoding("dense", store())]
    if args.prefill != "dense":
        out.append(Encoding(args.prefill, store(), prefill_attention(args, model.config)))
    if getattr(args, "star", False):
        settings = parse_settings(args.shards, args.star_blocks, args.star_anchors)
        # A shard holds at most the whole context, plus the query, the scored or decoded tokens and a page
        # per fork of the query prefill's readers (copy-on-write of a shared last page).
        room = positions + 2 * (args.eval_tokens + args.agree_tokens) + 64 * args.page_size
        clients = shard_clients([s.shards for s in settings], model.config, room, args.page_size, args.star_servers)
        out += [Encoding(s.label, clients[s.shards], star=StarEncoder(s, args.star_query_tokens)) for s in settings]
    return out


def main(args: argparse.Namespace) -> int:
    """Run every part of the harness, print tables, write the JSON and the plot.

    With --prefill minference every measurement runs twice, after a dense prefill and after a
    MInference prefill, each in a store of its own (so neither reuses the other's cached prefix);
    both are compared with dense prefill and dense decoding. With --star each Star Attention setting
    (docs/sparse-attention.md §4) encodes the same prompts over its shards and decodes them densely through
    phase 2, compared with the same dense baseline.
    """
    from kvcache.engine.load import load_model

    model, tok = load_model(args.model)
    contexts = sorted((int(c) for c in args.contexts.split(",") if c.strip()), reverse=True)  # longest first
    lengths = sorted((int(n) for n in args.passkey_lengths.split(",") if n.strip()), reverse=True)
    ruler_lengths = [int(n) for n in getattr(args, "ruler_lengths", "").split(",") if n.strip()]
    encs = encodings(args, model, max(contexts + lengths + ruler_lengths, default=1))
    report: dict = {"model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)", "torch": torch.__version__,
                    "python": platform.python_version(), "command": " ".join(sys.argv), "perplexity": [],
                    "agreement": [], "passkey": []}
    if args.prefill != "dense":
        attention = encs[1].attention
        report["prefill"] = {"method": args.prefill, "patterns": attention.patterns.model,
                             "pattern_counts": attention.patterns.counts(), "served": args.minference_served}
    if getattr(args, "star", False):
        report["star"] = {"shards": args.shards, "blocks": args.star_blocks, "anchors": args.star_anchors,
                          "query_tokens": args.star_query_tokens, "servers": args.star_servers,
                          "settings": [e.name for e in encs if e.star is not None]}
    gate_dim = GATE_DIM
    if args.gate:
        from kvcache.engine.gate_prefill import check_gate_for_model
        from kvcache.methods.gate_store import attach_gate

        gate = load_gate(args.gate)  # read once; each store checks it against its own shape
        check_gate_for_model(gate, model.config)
        gate_dim = gate.shape.gate_dim
        for enc in encs:
            if hasattr(enc.client, "store"):  # in-process; a server holds its own (kvcache serve --gate)
                attach_gate(enc.client.store, gate)
        report["gate"] = args.gate
    gate_grid = (args.gate_bytes, args.gate_pages) if args.gate else ("", "")
    grid_cost = {"head_dim": model.config.head_dim, "gate_dim": gate_dim, "quest_bytes": args.quest_bytes,
                 "oracle_bytes": args.oracle_bytes, "oracle_share": args.oracle_share,
                 "gate_threshold": args.gate_threshold if args.gate else "",
                 "gate_dense_layers": args.gate_dense_layers if args.gate else "",
                 "gate_oracle_layers": args.gate_oracle_layers if args.gate else "",
                 "num_layers": model.config.num_layers, "at_bytes": args.at_bytes,
                 "allocation": load_allocation(args.allocation) if args.allocation else None,
                 "min_coverage": args.min_coverage}
    heldout = getattr(args, "heldout", False)
    floor = getattr(args, "floor", None)
    floor = ("auto" if heldout else "") if floor is None else floor
    n_windows = args.windows if args.windows is not None else HELDOUT_WINDOWS if heldout else 1
    config = encs[0].client.config

    def grid_at(n: int, scored: int = 0) -> list[tuple[str, AttentionSpec]]:
        """The rows at `n` tokens, the floor matched to the bytes read while `scored` last tokens are scored."""
        full = method_grid(n, args.page_size, args.sparq, args.quest, *gate_grid, **grid_cost)
        return full + floor_grid(full, n, config, floor, n - scored // 2)

    text_ids = tok.encode(evaluation_text())
    try:
        starts = window_starts(len(text_ids), contexts, n_windows, args.window_stride, disjoint=heldout)
    except ValueError as exc:
        raise SystemExit(f"kvcache eval: {exc}") from None
    report["text"] = {"evaluation": EVALUATION_SOURCE, "evaluation_tokens": len(text_ids),
                      "calibration": CALIBRATION_SOURCE, "calibration_use": "train-gate, search-patterns (not scored)"}
    report["windows"] = n_windows
    report["window_starts"] = {str(C): starts[C] for C in contexts}
    report["floor"] = floor
    report["bootstrap"] = {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "level": eval_stats.LEVEL,
                           "unit": "window", "paired": True}
    for n in contexts + lengths:  # every setting at every length, before the first is scored (c/n depends on it)
        try:
            grid_at(n, args.eval_tokens if n in contexts else 0)
        except ValueError as exc:
            raise SystemExit(f"kvcache eval: a setting does not apply at {n} tokens: {exc}") from None
    for C, start in [(c, start) for c in contexts for start in starts[c]]:
        window = text_ids[start : start + C]
        M = args.eval_tokens
        full = grid_at(C, M)
        base = None  # dense prefill, dense decode: (perplexity, forced argmax, free-running tokens, bytes)
        for enc in encs:
            grid = enc.grid(full)
            labels, specs = [g[0] for g in grid], [g[1] for g in grid]
            t0 = time.perf_counter()
            before = _pairs(enc.attention)
            run = teacher_force(model, enc.client, window[: C - M], window[C - M :], specs, enc.attention,
                                enc.encoder())
            density = _density(enc.attention, before)
            ppl = perplexity(run.nll)
            prompt = window[: C - args.agree_tokens]
            free = greedy_methods(model, enc.client, prompt, specs, args.agree_tokens, enc.attention, enc.encoder())
            if base is None:
                base = (ppl[0], run.argmax[0], free[0], run.bytes_per_token[0])
            agree = (run.argmax == base[1]).float().mean(dim=1).tolist()
            for i, label in enumerate(labels):
                name = enc.label(label)
                same = next((j for j, (a, b) in enumerate(zip(free[i], base[2])) if a != b), len(base[2]))
                equal = sum(a == b for a, b in zip(free[i], base[2])) / len(base[2])
                row = {"context": C, "window_start": start, "method": name, "prefill": enc.kind, **_spec(specs[i]),
                       **enc.fields(C - M),
                       "perplexity": ppl[i], "vs_dense": ppl[i] / base[0] - 1,
                       "bytes_per_token": run.bytes_per_token[i],
                       "bytes_vs_dense": run.bytes_per_token[i] / base[3], "top1_agreement_forced": agree[i],
                       # what the pooled statistics sum over windows: nats, and positions scored
                       "nll_sum": float(run.nll[i].double().sum()), "scored_tokens": run.nll.shape[1],
                       "top1_matches": eval_stats.top1_matches(run.argmax[i], base[1])}
                if density is not None:
                    row["prefill_density"] = density
                report["perplexity"].append(row)
                report["agreement"].append({"context": C, "window_start": start, "method": name, "prefill": enc.kind,
                                            **enc.fields(len(prompt)), "greedy_tokens_equal_to_dense_until": same,
                                            "greedy_tokens_equal_share": equal, "of": len(base[2])})
                print(f"ppl C={C:>5}{f' @{start}' if n_windows > 1 else ''} {name:<24} {ppl[i]:8.3f} "
                      f"({ppl[i] / base[0] - 1:+.2%}) bytes/token "
                      f"{run.bytes_per_token[i]:>12,.0f} ({row['bytes_vs_dense']:.3f}x) "
                      f"top-1 agree {agree[i]:.3f}  free-run same for {same}/{len(base[2])} ({equal:.0%} equal)"
                      + ("" if density is None else f"  prefill density {density:.3f}"), flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if n_windows > 1 or heldout:
        report["perplexity_mean"] = pooled_windows(report["perplexity"], report["agreement"], args.bootstrap,
                                                   args.bootstrap_seed)
        for r in report["perplexity_mean"]:
            print(_pooled_line(r), flush=True)
    depths = [float(x) for x in args.depths.split(",")]
    for n in lengths:
        full = grid_at(n)
        for depth in sorted(depths, reverse=True):
            for trial in range(args.trials):
                prompt = passkey_prompt(tok, n, depth, seed=hash((n, depth, trial)) % 2**31)
                for enc in encs:
                    grid = enc.grid(full)
                    labels, specs = [g[0] for g in grid], [g[1] for g in grid]
                    before = _pairs(enc.attention)
                    # Star's query is the question: the context (filler and key) is what phase 1 encodes.
                    outs = greedy_methods(model, enc.client, prompt.ids, specs, 8, enc.attention,
                                          enc.encoder(prompt.question_tokens))
                    density = _density(enc.attention, before)
                    for label, out in zip(labels, outs):
                        answer = tok.decode(out)
                        found = re.findall(r"\d{5}", answer)
                        row = {"length": prompt.length, "depth": depth, "method": enc.label(label),
                               "prefill": enc.kind, **enc.fields(prompt.length, prompt.question_tokens),
                               "key": prompt.key, "answer": answer, "correct": bool(found) and found[0] == prompt.key}
                        if density is not None:
                            row["prefill_density"] = density
                        report["passkey"].append(row)
                    print(f"passkey n={prompt.length} depth={depth} key={prompt.key} prefill={enc.name}: " +
                          ", ".join(f"{enc.label(lb)}={'ok' if r['correct'] else 'no'}"
                                    for lb, r in zip(labels, report["passkey"][-len(labels):])), flush=True)
    if ruler_lengths:
        report["ruler"], report["ruler_summary"] = [], []
        for n in sorted(ruler_lengths, reverse=True):
            grid = encs[0].grid(grid_at(n))
            items = ruler_suite(tok, [n], per_task=args.ruler_items, seed=args.ruler_seed)
            rows = ruler_agreement(model, encs[0].client, grid, items, tok, encs[0].attention,
                                   log=lambda line: print("ruler " + line, flush=True))
            report["ruler"] += rows
            report["ruler_summary"] += ruler_summary(rows)
        for r in report["ruler_summary"]:
            print(f"ruler n={r['length']} {r['method']:<30} agrees with dense on {r['agreement']:.0%} of "
                  f"{r['items']} items", flush=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    if args.plot and plot(report, args.plot):
        print(f"wrote {args.plot}")
    return 0


def window_starts(n_tokens: int, contexts: list[int], windows: int, stride: int,
                  disjoint: bool = False) -> dict[int, list[int]]:
    """Token offsets of each context's windows in a text of `n_tokens` tokens: `windows` of them, `stride` apart
    (0: the context apart; with `disjoint`, spread over the whole text, n_tokens / windows apart, and a stride
    shorter than the context refused). ValueError if a window passes the end of the text."""
    if windows < 1 or stride < 0:
        raise ValueError("--windows must be at least 1 and --window-stride not negative")
    starts = {}
    for C in contexts:
        step = stride or (max(C, n_tokens // windows) if disjoint else C)
        if disjoint and step < C:
            raise ValueError(f"windows of {C} tokens {step} apart overlap; held-out windows must be disjoint")
        starts[C] = [j * step for j in range(windows)]
        if starts[C][-1] + C > n_tokens:
            raise ValueError(f"a window of {C} tokens at {starts[C][-1]} passes the end of the text "
                             f"({n_tokens} tokens)")
    return starts


def pooled_windows(perplexity: list[dict], agreement: list[dict], resamples: int = eval_stats.RESAMPLES,
                   seed: int = eval_stats.SEED) -> list[dict]:
    """Per (context, method), the windows pooled: perplexity over all their scored tokens (windows score equally
    many, so the geometric mean), its change against pooled dense, mean agreement, and the worst window; where the
    rows carry their sums (nll_sum, scored_tokens, top1_matches), the perplexity ratio to dense and the top-1
    agreement with paired bootstrap intervals over windows, and the comparison with the window floor."""
    pooled = []
    for key in dict.fromkeys((r["context"], r["method"]) for r in perplexity):
        rows = _windows_of(perplexity, *key)
        dense = _windows_of(perplexity, key[0], "dense")
        free = [r["greedy_tokens_equal_share"] for r in agreement if (r["context"], r["method"]) == key]
        ppl = math.exp(sum(math.log(r["perplexity"]) for r in rows) / len(rows))
        base = math.exp(sum(math.log(r["perplexity"]) for r in dense) / len(dense))
        per_window = {"window_start", "perplexity", "vs_dense", "bytes_per_token", "top1_agreement_forced",
                      "prefill_density", "nll_sum", "scored_tokens", "top1_matches"}
        entry = {
            **{k: v for k, v in rows[0].items() if k not in per_window}, "windows": len(rows),
            "window_starts": [r["window_start"] for r in rows], "perplexity": ppl, "vs_dense": ppl / base - 1,
            "top1_agreement_forced": sum(r["top1_agreement_forced"] for r in rows) / len(rows),
            "greedy_tokens_equal_share": sum(free) / len(free),
            "worst_window_vs_dense": max(r["vs_dense"] for r in rows),
            "bytes_vs_dense": sum(r["bytes_vs_dense"] for r in rows) / len(rows),
        }
        if all("nll_sum" in r for r in rows + dense):
            entry.update(_intervals(rows, dense, resamples, seed))
        pooled.append(entry)
    if all("nll_sum" in r for r in perplexity):
        for entry in pooled:
            entry.update(_floor_fields(entry, pooled, perplexity, resamples, seed))
    return pooled


def _windows_of(perplexity: list[dict], context: int, method: str) -> list[dict]:
    """The per-window rows of one (context, method), in window order."""
    return sorted((r for r in perplexity if (r["context"], r["method"]) == (context, method)),
                  key=lambda r: r["window_start"])


def _intervals(rows: list[dict], dense: list[dict], resamples: int, seed: int) -> dict:
    """Pooled perplexity ratio to dense and top-1 agreement, with paired bootstrap intervals over windows, the
    per-window ratios' median and range, and mean attention bytes per token."""
    if [r["window_start"] for r in rows] != [r["window_start"] for r in dense]:
        raise ValueError("a method and dense must be scored on the same windows")
    tokens = [r["scored_tokens"] for r in rows]
    nll, nll_dense = [r["nll_sum"] for r in rows], [r["nll_sum"] for r in dense]
    ratio = eval_stats.perplexity_ratio(nll, nll_dense, tokens, resamples, seed)
    top1 = eval_stats.agreement([r["top1_matches"] for r in rows], tokens, resamples, seed)
    return {"scored_tokens": sum(tokens), "ppl_ratio": ratio.point, "ppl_ratio_ci95": ratio.bounds(),
            "ppl_ratio_windows": eval_stats.spread(eval_stats.window_ratios(nll, nll_dense, tokens)),
            "top1_agreement_forced": top1.point, "top1_agreement_ci95": top1.bounds(),
            "bytes_per_token": sum(r["bytes_per_token"] for r in rows) / len(rows)}


def _floor_fields(entry: dict, pooled: list[dict], perplexity: list[dict], resamples: int, seed: int) -> dict:
    """A pooled row's comparison with the window row (same context and prefill) nearest its bytes: log(ppl_method /
    ppl_window) with its paired bootstrap interval, the verdict, and whether it beats the window at equal bytes
    (within EQUAL_BYTES; None where no window row is that close, or for dense and window rows)."""
    floors = [f for f in pooled if f["attention"] == "window" and not f.get("layers")
              and (f["context"], f["prefill"]) == (entry["context"], entry["prefill"])]
    if entry["attention"] in ("dense", "window") or not floors:
        return {"floor": None, "beats_floor": None}
    floor = min(floors, key=lambda f: abs(math.log(f["bytes_vs_dense"] / entry["bytes_vs_dense"])))
    rows = _windows_of(perplexity, entry["context"], entry["method"])
    under = _windows_of(perplexity, floor["context"], floor["method"])
    diff = eval_stats.log_ratio([r["nll_sum"] for r in rows], [r["nll_sum"] for r in under],
                                [r["scored_tokens"] for r in rows], resamples, seed)
    equal = abs(floor["bytes_vs_dense"] / entry["bytes_vs_dense"] - 1) <= EQUAL_BYTES
    verdict = eval_stats.verdict(diff)
    return {"floor": {"method": floor["method"], "bytes_vs_dense": floor["bytes_vs_dense"], "equal_bytes": equal,
                      "log_ppl_diff": diff.point, "log_ppl_diff_ci95": diff.bounds(), "verdict": verdict},
            "beats_floor": verdict == "better" if equal else None}


def _pooled_line(r: dict) -> str:
    """One printed line of a pooled row."""
    line = (f"mean of {r['windows']} windows C={r['context']:>5} {r['method']:<24} {r['perplexity']:8.3f} "
            f"({r['vs_dense']:+.2%})")
    if "ppl_ratio_ci95" in r:
        lo, hi = r["ppl_ratio_ci95"]
        w = r["ppl_ratio_windows"]
        a_lo, a_hi = r["top1_agreement_ci95"]
        line += (f" ratio {r['ppl_ratio']:.4f} [{lo:.4f}, {hi:.4f}] (windows {w['median']:.4f}, "
                 f"{w['min']:.4f}..{w['max']:.4f}) top-1 {r['top1_agreement_forced']:.3f} [{a_lo:.3f}, {a_hi:.3f}] "
                 f"bytes {r['bytes_vs_dense']:.3f}x")
        if r.get("floor"):
            f = r["floor"]
            line += f"  vs {f['method']} ({f['bytes_vs_dense']:.3f}x): {f['verdict']}"
        return line
    return line + (f" top-1 agree {r['top1_agreement_forced']:.3f}  free-run {r['greedy_tokens_equal_share']:.0%} "
                   f"equal (worst window {r['worst_window_vs_dense']:+.2%})")


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
    own = {"layers": {str(layer): {"attention": m, "params": dict(p)} for layer, (m, p) in spec.layers.items()}}
    return {"attention": spec.method, "params": dict(spec.params), **(own if spec.layers else {})}


def _series(row: dict) -> str:
    """The plot's series of a perplexity row: its attention method, gate rows by threshold or per-layer methods
    apart, and a non-dense prefill's rows apart."""
    if row["attention"] == "gate" and row.get("layers"):
        series = "gate+layers"
    else:
        thresholded = row["attention"] == "gate" and row.get("params", {}).get("threshold") is not None
        series = "gate thr" if thresholded else row["attention"]
    return series if row.get("prefill", "dense") == "dense" else f"{row['prefill']}+{series}"


MARKERS = {"sparq": "o", "quest": "s", "gate": "^", "gate thr": "v", "gate+layers": "D", "oracle": "*", "window": "x"}


def plot(report: dict, path: str) -> bool:
    """Perplexity against attention bytes per token (relative to dense) of the decode methods (with intervals: the
    ratio and its bootstrap interval, one panel per context, the window floor as one more series), against the
    anchor's share of the block for Star Attention rows, and passkey accuracy; a panel only where there are rows
    (False, and no file, with none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = report.get("perplexity_mean", report["perplexity"])  # several windows: one point per setting
    sparse = [r for r in scored if r["attention"] != "dense"]
    intervals = bool(sparse) and all("ppl_ratio_ci95" in r for r in sparse)
    contexts = sorted({r["context"] for r in sparse})
    star = [r for r in scored if r["prefill"] == "star"]
    passkeys = report.get("passkey", [])
    panels = (len(contexts) if intervals else bool(sparse)) + bool(star) + bool(passkeys)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if intervals:
        for C in contexts:
            _ratio_panel(axes.pop(0), [r for r in sparse if r["context"] == C], C, report)
    elif sparse:
        left = axes.pop(0)
        for C in contexts:
            rows = [r for r in sparse if r["context"] == C]
            for series in dict.fromkeys(_series(r) for r in rows):
                pts = sorted((r["bytes_vs_dense"], 100 * r["vs_dense"]) for r in rows if _series(r) == series)
                left.plot(*zip(*pts), marker=MARKERS.get(series.rsplit("+", 1)[-1], "."), label=f"{series} C={C}")
        left.set_xscale("log", base=2)
        left.set_yscale("symlog", linthresh=10)  # a few % near dense and thousands of % at 1/16 on one axis
        left.set_xlabel("attention bytes per token / dense")
        left.set_ylabel("perplexity change vs dense (%)")
        left.axhline(0, color="gray", lw=0.5)
        left.legend(fontsize=7)
    if star:
        middle = axes.pop(0)
        groups = dict.fromkeys((r["context"], r["shards"], r["method"].rsplit(" a=", 1)[0]) for r in star)
        for C, shards, name in groups:
            rows = [r for r in star
                    if (r["context"], r["shards"], r["method"].rsplit(" a=", 1)[0]) == (C, shards, name)]
            pts = sorted((float(Fraction(r["anchor_fraction"])), 100 * r["vs_dense"]) for r in rows)
            middle.plot(*zip(*pts), marker="o", label=f"{name} C={C}")
        middle.set_xlabel("Star Attention anchor / block (docs/sparse-attention.md §4)")
        middle.set_ylabel("perplexity change vs dense prefill (%)")
        middle.axhline(0, color="gray", lw=0.5)
        middle.legend(fontsize=7)
    if passkeys:
        right = axes.pop(0)
        methods = list(dict.fromkeys(r["method"] for r in passkeys))
        acc = [sum(r["correct"] for r in passkeys if r["method"] == m) /
               max(1, sum(1 for r in passkeys if r["method"] == m)) for m in methods]
        right.barh(methods, acc)
        right.set_xlabel("passkey accuracy (all lengths and depths)")
        right.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _ratio_panel(ax, rows: list[dict], context: int, report: dict) -> None:
    """One context's pooled rows: perplexity ratio to dense with its bootstrap interval against bytes / dense, a
    line per series (the window floor dashed)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for series in dict.fromkeys(_series(r) for r in rows if r["prefill"] != "star"):
        pts = sorted((r["bytes_vs_dense"], r["ppl_ratio"], *r["ppl_ratio_ci95"]) for r in rows if _series(r) == series)
        x, y, lo, hi = (list(v) for v in zip(*pts))
        floor = series.rsplit("+", 1)[-1] == "window"
        ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], capsize=3,
                    marker=MARKERS.get(series.rsplit("+", 1)[-1], "."), ls="--" if floor else "-",
                    color="gray" if floor else None, label="window (floor)" if floor else series)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # ratios from a fraction of a percent to several times dense's perplexity
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())  # within a decade: every tick
    ax.axhline(1, color="gray", lw=0.5)
    ax.set_xlabel("attention bytes per token / dense")
    level = report.get("bootstrap", {}).get("level", eval_stats.LEVEL)
    ax.set_ylabel(f"perplexity / dense ({100 * level:.0f}% bootstrap interval over windows)")
    ax.set_title(f"C={context}, {report.get('windows')} windows", fontsize=9)
    ax.legend(fontsize=7)
