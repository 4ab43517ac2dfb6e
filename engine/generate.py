"""The generation loop: prefill each prompt into the KV store, then decode the batch step by step.

Every layer's decode attention goes through the KVCacheClient (in-process or remote), so the
method (dense, sparq, quest) is a parameter of the loop and the bytes it reads are counted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvcache.clients.inprocess import KVCacheClient
from kvcache.engine.config import PREFILL_CHUNK
from kvcache.engine.decode import DENSE, AttentionSpec, StepResult, decode_step
from kvcache.engine.graph_decode import GraphDecoder, replayable
from kvcache.engine.model import Llama
from kvcache.engine.prefill import PrefillAttention, PrefillDtypes, Progress, causal_attention, prefill
from kvcache.engine.sampling import GREEDY, Sampler
from kvcache.engine.tokenizer import StreamDecoder, Tokenizer

# (index of the prompt in the batch, token id) for every token as soon as it is chosen
TokenCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """Tokens generated per prompt and what producing them cost."""

    tokens: list[list[int]]  # per prompt, the stop token included when one ended it
    stop_reasons: list[str]  # per prompt: "stop" (a stop token) or "length" (max_new_tokens)
    prompt_tokens: int  # prompt positions, all prompts
    reused_tokens: int  # of those, positions found in the store's prefix cache (not recomputed)
    prefill_seconds: float
    decode_steps: int
    decode_tokens: int  # tokens chosen after a decode step (the first token of each prompt comes from prefill)
    decode_seconds: float
    attention_bytes: int  # bytes the store's attention read during decode, all layers and sequences
    texts: list[str] = field(default_factory=list)  # filled by generate_text
    # Decode steps per method that ran (a method that cannot apply yet runs another: SparQ while a sequence is
    # shorter than its k runs dense), and how many of them were replayed from CUDA graphs.
    steps_by_method: dict[str, int] = field(default_factory=dict)
    graph_steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: tokens chosen after decode steps per second of decoding (all prompts together)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def attention_bytes_per_token(self) -> float:
        """Attention bytes read from the store per decoded token (all layers)."""
        return self.attention_bytes / self.decode_tokens if self.decode_tokens else 0.0


def generate(
    model: Llama,
    client: KVCacheClient,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    spec: AttentionSpec = DENSE,
    sampler: Sampler = GREEDY,
    stop_ids: Sequence[int] = (),
    chunk_size: int = PREFILL_CHUNK,
    prefill_attention: PrefillAttention = causal_attention,
    prefill_dtypes: PrefillDtypes | None = None,
    on_token: TokenCallback | None = None,
    progress: Progress | None = None,
    graph: GraphDecoder | None = None,
    max_batch: int | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt (token ids), decoding the admitted prompts as one
    batch.

    At most `max_batch` sequences decode together (None: every prompt): when one finishes, the next prompt is
    prefilled and joins the batch between steps (continuous batching), so the batch stays full. A prompt stops at
    its first token in `stop_ids`; its sequence is freed from the store as it finishes. Prefill computes in
    `prefill_dtypes` (default: the model's dtype; engine/prefill.py's prefill_dtypes picks them). With `graph`,
    steps whose every layer runs one method that graph_decode.replayable allows are replayed from captured CUDA
    graphs (engine/graph_decode.py).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    prompts = [[int(t) for t in p] for p in prompts]
    limit = model.config.max_position_embeddings
    for p in prompts:
        if not p:
            raise ValueError("a prompt needs at least one token")
        if len(p) + max_new_tokens > limit:
            raise ValueError(f"a prompt of {len(p)} tokens plus {max_new_tokens} new ones exceeds the model's "
                             f"context of {limit}")
    stops = frozenset(int(s) for s in stop_ids)
    gen = sampler.generator()
    batch_limit = len(prompts) if max_batch is None else max_batch
    if batch_limit < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    seq_ids: list[str | None] = [None] * len(prompts)  # a prompt's sequence while it is admitted
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    positions = [len(p) for p in prompts]  # where each sequence's next token goes
    pending = list(range(len(prompts)))  # prompts not admitted yet, in order
    prefill_seconds, reused = 0.0, 0

    def take(rows: list[int], chosen: list[int]) -> list[int]:
        """Record the chosen tokens; frees the sequences that are done; returns the rows still generating."""
        alive = []
        for b, t in zip(rows, chosen):
            tokens[b].append(t)
            if on_token is not None:
                on_token(b, t)
            if t in stops:
                reasons[b] = "stop"
            elif len(tokens[b]) < max_new_tokens:
                alive.append(b)
                continue
            client.free(seq_ids[b])  # retired: its pages come back before the next admission
            seq_ids[b] = None
        return alive

    def admit(n: int) -> list[int]:
        """Prefill the next n pending prompts; returns those still generating after their first token."""
        nonlocal prefill_seconds, reused
        t0 = time.perf_counter()
        rows, last_logits = [], []
        for _ in range(n):
            b = pending.pop(0)
            info = client.create(token_ids=prompts[b])
            seq_ids[b] = info.seq_id
            reused += info.cached_tokens
            last_logits.append(prefill(model, client, info.seq_id, prompts[b], info.cached_tokens, chunk_size,
                                       prefill_attention, progress, prefill_dtypes))
            rows.append(b)
        prefill_seconds += time.perf_counter() - t0
        return take(rows, sampler.sample(torch.stack(last_logits), gen).tolist())

    try:
        active = admit(min(batch_limit, len(pending)))
        steps = decoded = attention_bytes = graph_steps = 0
        ran: dict[str, int] = {}
        t1, prefilled_before = time.perf_counter(), prefill_seconds
        while active or pending:
            if pending and len(active) < batch_limit:  # continuous batching: a finished sequence's place is taken
                active = active + admit(min(batch_limit - len(active), len(pending)))
                if not active:
                    continue
            rows = [seq_ids[b] for b in active]
            last, at = [tokens[b][-1] for b in active], [positions[b] for b in active]
            method, params = spec.for_length(min(at) + 1, client.config)
            ran[method] = ran.get(method, 0) + 1
            if graph is not None and not spec.layers and replayable(method, params) is None:
                step = StepResult(*graph.step(rows, last, at, method, params))
                graph_steps += 1
            else:
                step = decode_step(model, client, rows, last, at, spec)
            for b in active:
                positions[b] += 1
            steps, decoded, attention_bytes = steps + 1, decoded + len(active), attention_bytes + step.bytes_read
            active = take(active, sampler.sample(step.logits, gen).tolist())
        decode_seconds = time.perf_counter() - t1 - (prefill_seconds - prefilled_before)
    except BaseException:
        for s in seq_ids:  # best effort: the error that got us here is the one to report
            if s is not None:
                with contextlib.suppress(Exception):
                    client.free(s)
        raise
    return GenerationResult(tokens, reasons, sum(map(len, prompts)), reused, prefill_seconds, steps, decoded,
                            decode_seconds, attention_bytes, steps_by_method=ran, graph_steps=graph_steps)


def generate_text(
    model: Llama,
    tokenizer: Tokenizer,
    client: KVCacheClient,
    prompt: str | Sequence[Mapping[str, str]],
    chat: bool = False,
    on_text: Callable[[str], None] | None = None,
    **kwargs,
) -> GenerationResult:
    """generate() for one text prompt (a chat by the model's template if `chat`), stopping at the tokenizer's
    stop tokens; streams the answer's text to `on_text` as it comes and fills `texts`."""
    ids = tokenizer.prompt_ids(prompt, chat)
    stream = StreamDecoder(tokenizer)

    def on_token(b: int, token: int) -> None:
        if token in tokenizer.stop_ids:
            return
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)

    result = generate(model, client, [ids], stop_ids=tokenizer.stop_ids, on_token=on_token, **kwargs)
    answer = [t for t in result.tokens[0] if t not in tokenizer.stop_ids]
    result.texts = [tokenizer.decode(answer)]
    return result
