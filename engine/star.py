"""Star Attention across KV servers (docs/sparse-attention.md §4): anchored context encoding, then lse-merged decoding.

Phase 1 (context encoding). The context is split into blocks of b tokens. Block 1 is encoded alone.
Block i is encoded as [anchor ; block i], where the anchor is the context's first a tokens (a = b by
default, 0 <= a <= b). Attention inside that concatenation is ordinary causal attention, and every
token keeps its original position id, so the anchor sits at 0..a-1 and block i at its own
positions. The anchor's K/V are dropped and block i's K/V are appended to its shard. Shard r gets a
contiguous run of blocks (`StarPlan.shard_blocks`). The last shard is the query host. The ranks do
not talk to one another in phase 1. Each rank encodes its own blocks and writes them to its own
server only, and it computes the anchor once for all of them (the anchor's K/V are the same for
every block). `encode_context_torchrun` starts one rank per shard with `torchrun`
(torch.distributed, gloo on the CPU). The process group serves for rank assignment and for
gathering each rank's report (all_gather_object) and any error. No K/V go through it.
`encode_context_local` runs the same code in this process, one block after another.

Phase 2 (query and decoding). The query tokens need attention over the whole context plus causal
attention over the query itself. The engine's own prefill attends from K/V it holds. Here the
context's K/V stay on the shards and must not travel, so the query is prefilled as follows:
- Context part: the sharded sequence is forked once per query token of a chunk ("readers", which
  share pages copy-on-write and cost nothing but a page-table entry). Then per layer, one
  ShardedClient.attend over the readers (batch = the chunk's tokens) fans out to every shard,
  and each shard returns (out, lse) per token. The forks exist because `attend` takes one query
  per sequence. Every context position precedes every query token, so no mask is needed, and a
  layer of a chunk costs one round trip per shard instead of one per token.
- Query part: exact causal attention over the query's own K/V, held by this process as the
  engine's prefill holds a prompt's, with its lse.
- The two parts are merged by lse (§4, exact). The query's K/V are then appended to the last shard
  and the readers are freed. Fetching the context's K/V to the query host would move the whole
  cache over the network, which Star Attention exists to avoid.
Decoding is `kvcache.engine.decode.decode_step` over the ShardedClient: each layer makes one attend call,
whose new K/V go to the last shard and whose attention fans out to all shards and is merged by lse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvcache.clients.sharded import ShardedClient
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import DENSE, AttentionSpec, decode_step
from kvcache.engine.model import Llama
from kvcache.engine.prefill import PromptKV, causal_attention
from kvcache.engine.sampling import GREEDY, Sampler
from kvcache.methods import merge_lse

# ---- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StarPlan:
    """How a context of `context_len` tokens is split: blocks of `block_size`, an anchor of `anchor_size`,
    the blocks dealt to `num_shards` shards in contiguous runs (the first shards get one more when uneven)."""

    context_len: int
    num_shards: int
    block_size: int
    anchor_size: int

    @classmethod
    def make(cls, context_len: int, num_shards: int, block_size: int | None = None,
             anchor_size: int | None = None) -> StarPlan:
        """Defaults: one block per shard (b = ceil(context / shards)) and the anchor a whole block."""
        if context_len < 1 or num_shards < 1:
            raise ValueError(f"need a context (got {context_len} tokens) and a shard (got {num_shards})")
        b = block_size if block_size is not None else -(-context_len // num_shards)
        a = b if anchor_size is None else anchor_size
        if b < 1:
            raise ValueError(f"block_size={b} must be positive")
        if not 0 <= a <= b:
            raise ValueError(f"anchor_size={a} must be in [0, block_size={b}]")
        return cls(context_len, num_shards, min(b, context_len), min(a, context_len))

    def blocks(self) -> list[tuple[int, int]]:
        """[start, end) of every block."""
        n, b = self.context_len, self.block_size
        return [(s, min(s + b, n)) for s in range(0, n, b)]

    def shard_blocks(self) -> list[list[tuple[int, int]]]:
        """The blocks of each shard: contiguous runs, in order."""
        blocks = self.blocks()
        per, extra = divmod(len(blocks), self.num_shards)
        runs, at = [], 0
        for r in range(self.num_shards):
            n = per + (r < extra)
            runs.append(blocks[at : at + n])
            at += n
        return runs

    def shard_lengths(self) -> list[int]:
        """Context positions each shard holds after phase 1."""
        return [sum(e - s for s, e in run) for run in self.shard_blocks()]


# ---- phase 1: anchored block encoding --------------------------------------------------------


def encode_after(model: Llama, prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, ids: Sequence[int],
                 positions: Sequence[int], chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [L, T, Hkv, d] of tokens `ids` at `positions`, encoded causally after a prefix whose K/V
    ([L, A, Hkv, d], or None) are given: ordinary causal attention over [prefix ; ids], in chunks."""
    c = model.config
    A = 0 if prefix_k is None else prefix_k.shape[1]
    T = len(ids)
    device = model.output_weight.device
    kv = PromptKV(c.num_layers, A + T, c.num_kv_heads, c.head_dim, model.dtype, device)
    if A:
        kv.k[:, :A], kv.v[:, :A] = prefix_k, prefix_v
    tokens = torch.tensor([int(t) for t in ids], dtype=torch.long, device=device)
    pos = torch.tensor([int(p) for p in positions], dtype=torch.long, device=device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s=s, e=e) -> torch.Tensor:
            kv.write(layer, A + s, k[0], v[0])
            return causal_attention(q[0], kv.k[layer, : A + e], kv.v[layer, : A + e])[None]

        model(tokens[None, s:e], pos[None, s:e], attend, last_only=True)
    return kv.k[:, A:], kv.v[:, A:]


def encode_blocks(model: Llama, context_ids: Sequence[int], blocks: Sequence[tuple[int, int]], anchor_size: int,
                  chunk_size: int = 256) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start, k, v) per block, in order: the first block of the context alone, any other after the anchor
    (the first `anchor_size` tokens at positions 0..a-1), whose K/V are computed once and never returned."""
    anchor: tuple[torch.Tensor, torch.Tensor] | None = None
    for start, end in blocks:
        ids, positions = context_ids[start:end], range(start, end)
        if start == 0 or anchor_size == 0:
            k, v = encode_after(model, None, None, ids, positions, chunk_size)
        else:
            if anchor is None:
                anchor = encode_after(model, None, None, context_ids[:anchor_size], range(anchor_size), chunk_size)
            k, v = encode_after(model, *anchor, ids, positions, chunk_size)
        yield start, k, v


@dataclass
class Phase1Report:
    """What phase 1 took: wall time on the query host (process start and model load included for torchrun),
    and per rank the seconds spent encoding and appending and the positions written."""

    launcher: str
    seconds: float
    ranks: list[dict] = field(default_factory=list)

    @property
    def encode_seconds(self) -> float:
        """The slowest rank's encoding time: phase 1's compute, with the ranks in parallel."""
        return max((r.get("encode_seconds", 0.0) for r in self.ranks), default=0.0)


def write_blocks(model: Llama, client, sub_id: str, context_ids: Sequence[int], blocks: Sequence[tuple[int, int]],
                 anchor_size: int, chunk_size: int = 256) -> dict:
    """Encode `blocks` and append each to sub-sequence `sub_id` of `client` (one shard's server); a report."""
    dtype = client.config.dtype
    encode = append = 0.0
    positions = 0
    t0 = time.perf_counter()
    for _, k, v in encode_blocks(model, context_ids, blocks, anchor_size, chunk_size):
        t1 = time.perf_counter()
        encode += t1 - t0
        for s in range(0, k.shape[1], chunk_size):  # pieces well under the message size limit
            client.append(sub_id, k[:, s : s + chunk_size].to(dtype), v[:, s : s + chunk_size].to(dtype))
        positions += k.shape[1]
        t0 = time.perf_counter()
        append += t0 - t1
    return {"positions": positions, "blocks": len(blocks), "encode_seconds": encode, "append_seconds": append}


def encode_context_local(model: Llama, client, seq_id: str, context_ids: Sequence[int], plan: StarPlan,
                         chunk_size: int = 256) -> Phase1Report:
    """Phase 1 in this process, shard after shard (tests, and a reference for the torchrun path)."""
    t0 = time.perf_counter()
    subs = client.sub_ids(seq_id)
    ranks = []
    for r, blocks in enumerate(plan.shard_blocks()):
        report = write_blocks(model, client.shards[r], subs[r], context_ids, blocks, plan.anchor_size, chunk_size)
        ranks.append({"rank": r, **report})
    client.describe(seq_id)  # the shards were written behind the sharded client's back
    return Phase1Report("in-process", time.perf_counter() - t0, ranks)


def save_model(model: Llama, path: str | os.PathLike) -> dict:
    """Write the weights for phase-1 workers (they map them, no GGUF decoding per rank); the plan's model entry."""
    torch.save(model.state_dict(), path)
    return {"weights": str(path), "config": dataclasses.asdict(model.config),
            "dtype": str(model.dtype).removeprefix("torch.")}


def load_saved_model(entry: Mapping) -> Llama:
    """The model save_model wrote, its tensors memory-mapped from the file."""
    with torch.device("meta"):
        model = Llama(ModelConfig(**entry["config"]))
    state = torch.load(entry["weights"], mmap=True, weights_only=True)
    model.load_state_dict(state, assign=True)
    return model.to(getattr(torch, entry["dtype"])).eval()


def encode_context_torchrun(model_entry: Mapping, client, seq_id: str, context_ids: Sequence[int], plan: StarPlan,
                            chunk_size: int = 256, token_file: str | None = None, timeout: float = 1800.0,
                            threads_per_rank: int | None = None) -> Phase1Report:
    """Phase 1 by `torchrun --standalone --nproc-per-node N -m kvcache.engine.star_worker PLAN`: one rank per shard,
    each encoding its blocks and appending them to its own server (client.names[rank])."""
    N = client.num_shards
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // N)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvcache-star-") as tmp:
        plan_path, result_path = pathlib.Path(tmp, "plan.json"), pathlib.Path(tmp, "result.json")
        plan_path.write_text(json.dumps({
            "endpoints": list(client.names), "sub_ids": client.sub_ids(seq_id), "context_ids": list(context_ids),
            "plan": dataclasses.asdict(plan), "model": dict(model_entry), "chunk_size": chunk_size,
            "threads": threads, "token_file": token_file, "result": str(result_path),
        }))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={N}",
               "-m", "kvcache.engine.star_worker", str(plan_path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
        if not result_path.exists():
            raise RuntimeError(f"phase 1 (torchrun, {N} ranks) failed with exit code {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        ranks = json.loads(result_path.read_text())
    failed = [r for r in ranks if r.get("error")]
    if failed:
        raise RuntimeError("phase 1 failed on " + "; ".join(f"rank {r['rank']} ({client.names[r['rank']]}): "
                                                            f"{r['error']}" for r in failed))
    client.describe(seq_id)  # the ranks wrote to the shards directly
    return Phase1Report("torchrun", time.perf_counter() - t0, ranks)


# ---- phase 2: the query and decoding ---------------------------------------------------------


def causal_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the last T positions q [T, Hq, d] over k, v [S, Hkv, d], in float32, with its
    log-sum-exp: out [T, Hq, d], lse [T, Hq] (natural log), for an lse merge with other parts."""
    T, Hq, d = q.shape
    S, Hkv, _ = k.shape
    G = Hq // Hkv
    kf = k.float().repeat_interleave(G, dim=1)  # query head h reads kv head h // G
    vf = v.float().repeat_interleave(G, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) / math.sqrt(d)  # [Hq, T, S]
    visible = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, T]
    out = torch.einsum("hts,shd->thd", torch.exp(scores - lse[..., None]), vf)
    return out, lse.transpose(0, 1)


def prefill_query(model: Llama, client, seq_id: str, query_ids: Sequence[int], start: int, chunk_size: int = 64,
                  append_options: Mapping | None = None) -> torch.Tensor:
    """Phase 2 for the query: tokens `query_ids` at positions start.. attend to the `start` context positions
    already in `seq_id` (through reader forks, per layer one attend call) and causally to themselves
    (locally); lse-merged. Their K/V are then appended (with `append_options`, e.g. {"shard": -1}).
    Returns the float32 logits [vocab] after the last query token."""
    c = model.config
    dtype = client.config.dtype
    n = len(query_ids)
    if n < 1:
        raise ValueError("the query needs at least one token")
    kv = PromptKV(c.num_layers, n, c.num_kv_heads, c.head_dim, model.dtype)
    ids = torch.tensor([int(t) for t in query_ids], dtype=torch.long)
    readers: list[str] = []
    logits = None
    try:
        if start > 0:
            readers = [client.fork(seq_id).seq_id for _ in range(min(chunk_size, n))]
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s=s, e=e) -> torch.Tensor:
                kv.write(layer, s, k[0], v[0])
                out, lse = causal_attention_lse(q[0], kv.k[layer, :e], kv.v[layer, :e])
                if readers:
                    ctx = client.attend(readers[: e - s], layer, q[0].to(dtype))
                    out, lse = merge_lse(torch.stack((ctx.out.float(), out)), torch.stack((ctx.lse.float(), lse)))
                return out.to(q.dtype)[None]

            logits = model(ids[None, s:e], torch.arange(start + s, start + e)[None], attend, last_only=True)
            client.append(seq_id, kv.k[:, s:e].to(dtype), kv.v[:, s:e].to(dtype), **dict(append_options or {}))
    finally:
        for r in readers:
            with contextlib.suppress(Exception):
                client.free(r)
    return logits[0, -1]


@dataclass
class StarResult:
    """One Star Attention generation: tokens, and what each phase took."""

    tokens: list[int]
    stop_reason: str  # "stop" or "length"
    context_tokens: int
    query_tokens: int
    plan: StarPlan
    phase1: Phase1Report
    query_seconds: float
    step_seconds: list[float]  # per decode step (all layers, fan-out and merge included)
    attention_bytes: int  # read by the shards' attention during decoding
    text: str = ""

    @property
    def decode_tokens(self) -> int:
        return len(self.step_seconds)

    @property
    def median_step_seconds(self) -> float:
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else 0.0

    @property
    def tokens_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total > 0 else 0.0


def star_generate(
    model: Llama,
    client,
    context_ids: Sequence[int],
    query_ids: Sequence[int],
    *,
    block_size: int | None = None,
    anchor_size: int | None = None,
    max_new_tokens: int = 64,
    spec: AttentionSpec = DENSE,
    sampler: Sampler = GREEDY,
    stop_ids: Sequence[int] = (),
    chunk_size: int = 256,
    launcher: str = "torchrun",
    model_entry: Mapping | None = None,
    token_file: str | None = None,
    on_token: Callable[[int], None] | None = None,
    threads_per_rank: int | None = None,
) -> StarResult:
    """Star Attention over a ShardedClient: phase 1 encodes `context_ids` in anchored blocks onto the shards
    (launcher "torchrun": one rank per shard, `threads_per_rank` torch threads each, default cores / shards;
    "local": in this process), phase 2 prefills `query_ids` and decodes up to `max_new_tokens` tokens with
    `spec`. The sequence is freed at the end."""
    context_ids, query_ids = [int(t) for t in context_ids], [int(t) for t in query_ids]
    limit = model.config.max_position_embeddings
    if len(context_ids) + len(query_ids) + max_new_tokens > limit:
        raise ValueError(f"{len(context_ids)} context + {len(query_ids)} query + {max_new_tokens} new tokens exceed "
                         f"the model's context of {limit}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    plan = StarPlan.make(len(context_ids), client.num_shards, block_size, anchor_size)
    stops = frozenset(int(s) for s in stop_ids)
    gen = sampler.generator()
    seq = client.create().seq_id
    try:
        if launcher == "local":
            phase1 = encode_context_local(model, client, seq, context_ids, plan, chunk_size)
        elif launcher == "torchrun":
            with contextlib.ExitStack() as stack:
                if model_entry is None:
                    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvcache-star-model-"))
                    model_entry = save_model(model, pathlib.Path(tmp, "model.pt"))
                phase1 = encode_context_torchrun(model_entry, client, seq, context_ids, plan, chunk_size, token_file,
                                                 threads_per_rank=threads_per_rank)
        else:
            raise ValueError(f"launcher {launcher!r} unknown; expected 'torchrun' or 'local'")
        if client.shard_lengths(seq) != plan.shard_lengths():
            raise RuntimeError(f"after phase 1 the shards hold {client.shard_lengths(seq)} positions; the plan "
                               f"says {plan.shard_lengths()}")
        t0 = time.perf_counter()
        logits = prefill_query(model, client, seq, query_ids, len(context_ids), append_options={"shard": -1})
        query_seconds = time.perf_counter() - t0
        tokens: list[int] = []
        steps: list[float] = []
        nbytes = 0
        reason = "length"
        position = len(context_ids) + len(query_ids)
        while True:
            token = int(sampler.sample(logits[None], gen)[0])
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                reason = "stop"
                break
            if len(tokens) >= max_new_tokens:
                break
            t0 = time.perf_counter()
            step = decode_step(model, client, [seq], [token], [position], spec)
            steps.append(time.perf_counter() - t0)
            nbytes += step.bytes_read
            logits = step.logits[0]
            position += 1
    finally:
        with contextlib.suppress(Exception):
            client.free(seq)
    return StarResult(tokens, reason, len(context_ids), len(query_ids), plan, phase1, query_seconds, steps, nbytes)


# ---- prompts ---------------------------------------------------------------------------------


def split_prompt(tokenizer, context: str, question: str | None, chat: bool,
                 query_tokens: int = 32) -> tuple[list[int], list[int]]:
    """(context ids, query ids) of a prompt. With a question, the prompt is `context` + a blank line +
    `question` (in the chat template if `chat`) and the query is everything from where the question's
    tokens start (the generation prompt included); without one, the query is the last `query_tokens` tokens."""
    if question is None:
        ids = tokenizer.prompt_ids(context, chat)
        q = max(1, min(query_tokens, len(ids) - 1))
        return ids[:-q], ids[-q:]
    full = f"{context}\n\n{question}"
    ids = tokenizer.prompt_ids([{"role": "user", "content": full}] if chat else full, chat)
    alone = tokenizer.prompt_ids([{"role": "user", "content": context}] if chat else context, chat)
    common = 0
    while common < min(len(ids), len(alone)) and ids[common] == alone[common]:
        common += 1
    common = min(common, len(ids) - 1)
    return ids[:common], ids[common:]


# ---- `kvcache generate --star` ---------------------------------------------------------------


def connect(args, config) -> ShardedClient:
    """The ShardedClient of --servers (with --token-file and --block-size), checked against the model's shape."""
    from kvcache.clients.sharded import ShardedClient
    from kvcache.engine.errors import UnsupportedModel

    token = None
    if getattr(args, "token_file", None):
        with open(args.token_file) as f:
            token = f.read().strip()
    targets = [t.strip() for t in args.servers.split(",") if t.strip()]
    client = ShardedClient(targets, block_size=getattr(args, "block_size", None) or 4096, token=token)
    try:
        c = client.config
    except Exception:
        client.close()
        raise
    want = (config.num_layers, config.num_kv_heads, config.head_dim)
    if (c.num_layers, c.num_kv_heads, c.head_dim) != want:
        client.close()
        raise UnsupportedModel(f"the servers {targets} store (layers, kv heads, head dim) = "
                               f"{(c.num_layers, c.num_kv_heads, c.head_dim)}; the model needs {want}")
    return client


def run_cli(args) -> int:
    """`kvcache generate --star --servers ...`: Star Attention over the servers, streaming the answer; 0 on success."""
    from kvcache.engine.load import load_model
    from kvcache.engine.method_flags import attention_spec
    from kvcache.engine.sampling import Sampler
    from kvcache.engine.tokenizer import StreamDecoder

    if not args.servers:
        raise ValueError("--star needs --servers host:port,... (one shard per server; the last is the query host)")
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = args.prompt
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    context_ids, query_ids = split_prompt(tokenizer, prompt, args.question, args.chat, args.query_tokens)
    spec = attention_spec(args, model.config.num_layers)
    stream = StreamDecoder(tokenizer)

    def on_token(token: int) -> None:
        if token not in tokenizer.stop_ids:
            print(stream.push(token), end="", flush=True)

    with connect(args, model.config) as client:
        result = star_generate(model, client, context_ids, query_ids, block_size=args.block_size,
                               anchor_size=args.anchor_size, max_new_tokens=args.max_new_tokens, spec=spec,
                               sampler=Sampler(args.temperature, args.top_p, args.seed), stop_ids=tokenizer.stop_ids,
                               chunk_size=args.chunk_size, token_file=args.token_file, on_token=on_token)
    print(flush=True)
    result.text = tokenizer.decode([t for t in result.tokens if t not in tokenizer.stop_ids])
    summary = star_summary(result, spec, args.servers)
    summary["load_seconds"] = round(load_seconds, 3)
    print(f"[star over {client.num_shards} servers, b={result.plan.block_size}, anchor={result.plan.anchor_size}, "
          f"{spec.method}] context {result.context_tokens} + query {result.query_tokens} tokens; phase 1 "
          f"{result.phase1.seconds:.2f} s (encoding {result.phase1.encode_seconds:.2f} s on the slowest rank); "
          f"query {result.query_seconds:.2f} s; {result.decode_tokens} decode steps, median "
          f"{1000 * result.median_step_seconds:.0f} ms ({result.tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def star_summary(result: StarResult, spec: AttentionSpec, servers: str | None = None) -> dict:
    """The figures of a Star Attention run, for JSON."""
    return {
        "servers": servers,
        "shards": result.plan.num_shards,
        "method": spec.method,
        "params": dict(spec.params),
        "layers": {str(layer): method for layer, (method, _) in spec.layers.items()},  # their own methods
        "block_size": result.plan.block_size,
        "anchor_size": result.plan.anchor_size,
        "shard_lengths": result.plan.shard_lengths(),
        "context_tokens": result.context_tokens,
        "query_tokens": result.query_tokens,
        "answer": result.text,
        "stop_reason": result.stop_reason,
        "phase1_launcher": result.phase1.launcher,
        "phase1_seconds": round(result.phase1.seconds, 3),
        "phase1_encode_seconds_slowest_rank": round(result.phase1.encode_seconds, 3),
        "phase1_ranks": result.phase1.ranks,
        "query_seconds": round(result.query_seconds, 3),
        "decode_steps": result.decode_tokens,
        "step_ms": [round(1000 * s, 2) for s in result.step_seconds],
        "median_step_ms": round(1000 * result.median_step_seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 3),
        "attention_bytes_per_token": round(result.attention_bytes / max(result.decode_tokens, 1)),
    }
