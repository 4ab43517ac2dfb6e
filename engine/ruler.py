"""A synthetic long-context suite in the style of RULER (Hsieh et al., 2024), scored as agreement with dense.

Four tasks, each item generated offline and deterministically from a seed and a target length in tokens:
  single_needle      one "special magic number" for a key hidden at some depth of a haystack; asked for it.
  multi_key_needle   several keys with a number each (distractors); asked for one key's number.
  multi_value        one key with several numbers at different depths; asked for all of them.
  variable_tracking  chains of assignments ("VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE.") spread through
                     the haystack; asked which variables hold a given value.
The haystack is consecutive prose sentences of the evaluation text (the standard library's docstrings, never
the calibration text a gate or a pattern search learned from: kvcache.engine.eval_data), from a seeded start.
A prompt is assembled from the token lists of its pieces (intro, sentences, inserted statements, question), the
last sentence cut so the prompt is exactly the target length.

The score of a decode attention method is not whether the model answers correctly (a small model such as
SmolLM2-135M often does not) but whether the method changes the answer: an item agrees when the method's greedy
answer tokens equal dense's. Every method decodes from one dense prefill of the prompt, side by side
(kvcache.engine.evaluation.greedy_methods), for as many tokens as the expected answer has. The first of them
comes from the prefill's logits, the same for every method; methods can differ from the second on. Whether the
decoded text names the expected answer (RULER's string match) is reported as well, for information.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvcache.engine.decode import AttentionSpec
from kvcache.engine.eval_data import evaluation_text
from kvcache.engine.evaluation import greedy_methods
from kvcache.engine.model import Llama
from kvcache.engine.prefill import PrefillAttention, causal_attention


class TextCodec(Protocol):
    """What the generators need of a tokenizer (kvcache.engine.tokenizer.Tokenizer is one)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class RulerItem:
    """One prompt of the suite, its expected answer, and how many greedy tokens are compared."""

    task: str
    ids: list[int]  # the prompt's token ids
    answer: str  # the expected continuation of the prompt, e.g. " 1234567"
    expected: tuple[str, ...]  # what a correct answer names: the number(s), or the variables
    answer_tokens: int  # greedy tokens compared with dense's: those of `answer` (the first comes from the prefill)
    length: int  # tokens of `ids`
    seed: int
    depths: tuple[float, ...]  # relative depth in the haystack of each inserted statement, in prompt order
    question_tokens: int  # the question's tokens at the end of `ids`


NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ONE_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                "The special magic number for {key} mentioned in the provided text is")
ALL_QUESTION = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                "The special magic numbers for {key} mentioned in the provided text are")
VARIABLE_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VARIABLE_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                     "Answer: According to the chain(s) of variable assignment in the text above, "
                     "{count} variables are assigned the value {value}, they are:")

# Keys are adjective-noun pairs, as RULER's word keys: ordinary words the haystack rarely holds together.
ADJECTIVES = ("amber autumn brave calm clever cobalt crimson curious dusty eager early fancy gentle golden hidden "
              "humble icy jolly lively lucky mellow misty noble odd olive quiet rapid rustic scarlet silent silver "
              "sleepy snowy steady sunny swift tidy velvet violet wandering wild windy wise witty young zesty").split()
NOUNS = ("anchor apple badger banjo beacon bison bucket candle canyon cactus comet cottage falcon ferry fiddle "
         "garden glacier harbor helmet island kettle lantern lemon meadow mitten needle orchard otter pebble pepper "
         "piano pigeon quilt rabbit river saddle shovel spruce teapot thimble tiger trumpet tulip valley violin "
         "walnut wagon willow").split()



# ---- haystack ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def haystack_sentences() -> tuple[str, ...]:
    """The prose sentences of the evaluation text (kvcache.engine.eval_data), in its order, each once."""
    seen: dict[str, None] = {}
    for paragraph in re.split(r"\n\s*\n", evaluation_text()):
        if paragraph.startswith(" ") or ">>>" in paragraph:  # indented or a session: code, not prose
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
            # No digits (they would be confused with the needles' numbers), no '=' (nor with assignments).
            if 30 <= len(sentence) <= 300 and re.fullmatch(r"[A-Z][^0-9=<>{}|\\]*\.", sentence):
                seen.setdefault(sentence)
    return tuple(seen)


def haystack(tok: TextCodec, tokens: int, rng: random.Random) -> list[list[int]]:
    """Token lists of consecutive sentences from a random start (wrapping around), exactly `tokens` in all."""
    sentences = haystack_sentences()
    start = rng.randrange(len(sentences))
    pieces: list[list[int]] = []
    left = tokens
    while left > 0:
        ids = tok.encode(" " + sentences[(start + len(pieces)) % len(sentences)])
        pieces.append(ids[:left])  # the last sentence is cut to the exact length
        left -= len(pieces[-1])
    return pieces


def assemble(tok: TextCodec, length: int, intro: str, inserts: Sequence[tuple[float, str]], question: str,
             rng: random.Random) -> tuple[list[int], tuple[float, ...], int]:
    """A prompt of exactly `length` tokens: intro, haystack with each (depth, statement) inserted at the sentence
    boundary nearest that relative depth (statements of one depth in the given order), question.

    Returns (ids, the depths in prompt order, the question's tokens).
    """
    head, tail = tok.encode(intro), tok.encode(question)
    ordered = sorted(inserts, key=lambda insert: insert[0])  # stable: chains keep their order
    statements = [tok.encode(" " + text) for _, text in ordered]
    fill = length - len(head) - len(tail) - sum(map(len, statements))
    if fill < 1:
        raise ValueError(f"a prompt of {length} tokens has no room for a haystack: intro, statements and question "
                         f"take {length - fill}")
    pieces = haystack(tok, fill, rng)
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    at: dict[int, list[list[int]]] = defaultdict(list)
    for (depth, _), ids in zip(ordered, statements):
        boundary = min(range(len(starts)), key=lambda i: abs(starts[i] - depth * fill))
        at[boundary].append(ids)
    ids = list(head)
    for i in range(len(pieces) + 1):
        for statement in at.get(i, []):
            ids += statement
        if i < len(pieces):
            ids += pieces[i]
    ids += tail
    return ids, tuple(depth for depth, _ in ordered), len(tail)


# ---- keys and values -----------------------------------------------------------------------------


def draw_keys(rng: random.Random, n: int) -> list[str]:
    """n distinct adjective-noun keys."""
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def draw_numbers(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    """n distinct numbers of `digits` digits, as text."""
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


def draw_variables(rng: random.Random, n: int) -> list[str]:
    """n distinct variable names of five capital letters."""
    names: dict[str, None] = {}
    while len(names) < n:
        names.setdefault("".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)))
    return list(names)


def _item(tok: TextCodec, task: str, seed: int, built: tuple[list[int], tuple[float, ...], int],
          expected: Sequence[str]) -> RulerItem:
    """The item of a built prompt whose answer lists `expected` after a space, comma-separated."""
    ids, depths, question_tokens = built
    answer = " " + ", ".join(expected)
    return RulerItem(task, ids, answer, tuple(expected), len(tok.encode(answer)), len(ids), seed, depths,
                     question_tokens)


# ---- tasks ---------------------------------------------------------------------------------------


def single_needle(tok: TextCodec, length: int, seed: int, depth: float | None = None) -> RulerItem:
    """One key's 7-digit number at relative `depth` (seeded if None) of a `length`-token prompt; asked for it."""
    rng = random.Random(seed)
    key, value = draw_keys(rng, 1)[0], draw_numbers(rng, 1)[0]
    depth = rng.random() if depth is None else depth
    built = assemble(tok, length, NEEDLE_INTRO, [(depth, NEEDLE.format(key=key, value=value))],
                     ONE_QUESTION.format(key=key), rng)
    return _item(tok, "single_needle", seed, built, [value])


def multi_key_needle(tok: TextCodec, length: int, seed: int, depth: float | None = None,
                     keys: int = 4) -> RulerItem:
    """`keys` keys with a number each at seeded depths, the asked one at `depth` (seeded if None)."""
    rng = random.Random(seed)
    names, values = draw_keys(rng, keys), draw_numbers(rng, keys)
    depths = [rng.random() if depth is None else depth] + [rng.random() for _ in range(keys - 1)]
    inserts = [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, names, values)]
    built = assemble(tok, length, NEEDLE_INTRO, inserts, ONE_QUESTION.format(key=names[0]), rng)
    return _item(tok, "multi_key_needle", seed, built, [values[0]])


def multi_value(tok: TextCodec, length: int, seed: int, values: int = 4) -> RulerItem:
    """One key with `values` numbers at seeded depths; asked for all of them (expected in prompt order)."""
    rng = random.Random(seed)
    key, numbers = draw_keys(rng, 1)[0], draw_numbers(rng, values)
    depths = sorted(rng.random() for _ in range(values))  # the numbers appear in the order drawn
    inserts = [(d, NEEDLE.format(key=key, value=v)) for d, v in zip(depths, numbers)]
    built = assemble(tok, length, NEEDLE_INTRO, inserts, ALL_QUESTION.format(key=key), rng)
    return _item(tok, "multi_value", seed, built, numbers)


def variable_tracking(tok: TextCodec, length: int, seed: int, hops: int = 4, chains: int = 2) -> RulerItem:
    """`chains` chains of `hops` + 1 variables, each starting from its own 5-digit value, interleaved at seeded
    depths; asked which variables hold the first chain's value (expected in assignment order)."""
    rng = random.Random(seed)
    names = draw_variables(rng, chains * (hops + 1))
    values = draw_numbers(rng, chains, digits=5)
    per_chain = [names[c * (hops + 1):(c + 1) * (hops + 1)] for c in range(chains)]
    statements = [[f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
                  for chain, value in zip(per_chain, values)]
    # A random interleaving that keeps each chain's order: a variable is assigned before it is read.
    order = [c for c in range(chains) for _ in range(hops + 1)]
    rng.shuffle(order)
    taken = [0] * chains
    texts = []
    for c in order:
        texts.append(statements[c][taken[c]])
        taken[c] += 1
    depths = sorted(rng.random() for _ in texts)
    question = VARIABLE_QUESTION.format(value=values[0], count=hops + 1)
    built = assemble(tok, length, VARIABLE_INTRO, list(zip(depths, texts)), question, rng)
    return _item(tok, "variable_tracking", seed, built, per_chain[0])


GENERATORS: dict[str, Callable[[TextCodec, int, int], RulerItem]] = {
    "single_needle": single_needle,
    "multi_key_needle": multi_key_needle,
    "multi_value": multi_value,
    "variable_tracking": variable_tracking,
}


def item_seed(seed: int, task: str, length: int, index: int) -> int:
    """The seed of the index-th item of a task at a length: stable across runs (no Python str hash)."""
    return zlib.crc32(f"{seed}/{task}/{length}/{index}".encode())


def ruler_suite(tok: TextCodec, lengths: Sequence[int], tasks: Sequence[str] = tuple(GENERATORS),
                per_task: int = 1, seed: int = 0) -> list[RulerItem]:
    """`per_task` items of every task at every length (tokens), longest first."""
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; known: {sorted(GENERATORS)}")
    return [GENERATORS[task](tok, n, item_seed(seed, task, n, j))
            for n in sorted(lengths, reverse=True) for task in tasks for j in range(per_task)]


def is_correct(item: RulerItem, text: str) -> bool:
    """Whether decoded `text` names every expected number (or variable) as a whole word, in any order.

    RULER's string match: extra words (list numbering, a distractor) do not count against an answer.
    """
    return all(re.search(rf"\b{re.escape(word)}\b", text) for word in item.expected)


# ---- scoring -------------------------------------------------------------------------------------


class ByteCounter:
    """A client that passes every call through, remembers the sequences it creates and forks in order, and adds
    each single-sequence attend call's bytes_read to that sequence's total."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.created: list[str] = []
        self.bytes: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def create(self, *args: Any, **kwargs: Any) -> Any:
        info = self.client.create(*args, **kwargs)
        self.created.append(info.seq_id)
        return info

    def fork(self, seq_id: str) -> Any:
        info = self.client.fork(seq_id)
        self.created.append(info.seq_id)
        return info

    def attend(self, seq_ids: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        result = self.client.attend(seq_ids, *args, **kwargs)
        if len(seq_ids) == 1:
            self.bytes[seq_ids[0]] += result.bytes_read
        return result


def greedy_with_bytes(model: Llama, client: Any, item: RulerItem, specs: Sequence[AttentionSpec],
                      prefill_attention: PrefillAttention = causal_attention
                      ) -> tuple[list[list[int]], list[float | None]]:
    """Each method's `item.answer_tokens` greedy tokens after the prompt, and the attention bytes it read per decoded
    token (all layers; None with no decode step: the first token comes from the prefill)."""
    counter = ByteCounter(client)
    outs = greedy_methods(model, counter, item.ids, specs, item.answer_tokens, prefill_attention)
    steps = item.answer_tokens - 1
    # greedy_methods creates the first row's sequence, then forks one per further row, in row order.
    rows = counter.created[-len(specs):]
    return outs, [counter.bytes[seq] / steps if steps else None for seq in rows]


def dense_row(specs: Sequence[tuple[str, AttentionSpec]]) -> int:
    """Index of the first plain dense spec (the baseline); ValueError if there is none."""
    for i, (_, spec) in enumerate(specs):
        if spec.method == "dense" and not spec.layers:
            return i
    raise ValueError("the specs need a plain dense one: agreement is measured against dense's answers")


def score_item(item: RulerItem, labels: Sequence[str], outs: Sequence[Sequence[int]],
               bytes_per_token: Sequence[float | None], dense: int, tok: TextCodec | None = None) -> list[dict]:
    """One row per method for one item: whether its answer tokens equal dense's, how many of them do (position by
    position), its text and correctness if `tok` is given, and its bytes per token."""
    base = list(outs[dense])
    rows = []
    for label, out, nbytes in zip(labels, outs, bytes_per_token):
        text = None if tok is None else tok.decode(list(out))
        rows.append({"task": item.task, "length": item.length, "seed": item.seed, "method": label,
                     "same_as_dense": list(out) == base, "tokens_equal": sum(a == b for a, b in zip(out, base)),
                     "of": len(base), "answer": text, "expected": item.answer,
                     "correct": None if text is None else is_correct(item, text), "bytes_per_token": nbytes})
    return rows


def aggregate(item_rows: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("task", "length", "method")
              ) -> list[dict]:
    """Per-item rows pooled per `keys`: items, agreement (share of items whose answer equals dense's), token
    agreement (share of answer tokens equal to dense's), exact (share answered correctly; None without text),
    mean bytes per token and its ratio to dense's rows of the same group."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in item_rows:
        groups[tuple(row[k] for k in keys)].append(row)
    out = []
    for key, rows in groups.items():
        scored = [r["correct"] for r in rows if r["correct"] is not None]
        nbytes = [r["bytes_per_token"] for r in rows if r["bytes_per_token"] is not None]
        out.append({**dict(zip(keys, key)), "items": len(rows),
                    "agreement": sum(r["same_as_dense"] for r in rows) / len(rows),
                    "token_agreement": sum(r["tokens_equal"] for r in rows) / max(1, sum(r["of"] for r in rows)),
                    "exact": sum(scored) / len(scored) if scored else None,
                    "bytes_per_token": sum(nbytes) / len(nbytes) if nbytes else None})
    return _with_bytes_vs_dense(out, [k for k in keys if k != "method"])


def _with_bytes_vs_dense(rows: list[dict], group: Sequence[str]) -> list[dict]:
    """Each row's bytes per token over the "dense" row's of its group (None where either is unknown)."""
    dense = {tuple(r[k] for k in group): r["bytes_per_token"] for r in rows if r["method"] == "dense"}
    for r in rows:
        base = dense.get(tuple(r[k] for k in group))
        r["bytes_vs_dense"] = r["bytes_per_token"] / base if base and r["bytes_per_token"] is not None else None
    return rows


def ruler_agreement(model: Llama, client: Any, specs: Sequence[tuple[str, AttentionSpec]],
                    items: Sequence[RulerItem], tok: TextCodec | None = None,
                    prefill_attention: PrefillAttention = causal_attention,
                    log: Callable[[str], None] | None = None) -> list[dict]:
    """Per (task, length, method): agreement with dense over `items` (see aggregate); every method decodes each
    item's answer from one dense prefill, side by side. `tok` decodes answers for the exact-match column."""
    labels, methods = [label for label, _ in specs], [spec for _, spec in specs]
    dense = dense_row(specs)
    per_item: list[dict] = []
    for item in items:
        outs, nbytes = greedy_with_bytes(model, client, item, methods, prefill_attention)
        rows = score_item(item, labels, outs, nbytes, dense, tok)
        per_item += rows
        if log is not None:
            log(f"{item.task} n={item.length} seed={item.seed}: "
                + ", ".join(f"{r['method']}={'same' if r['same_as_dense'] else 'differs'}" for r in rows))
    return aggregate(per_item)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """ruler_agreement's rows pooled over tasks per (length, method), weighted by items."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["length"], row["method"])].append(row)
    out = []
    for (length, method), group in groups.items():
        items = sum(r["items"] for r in group)

        def mean(field: str, group: list[Mapping[str, Any]] = group) -> float | None:
            known = [r for r in group if r[field] is not None]
            weight = sum(r["items"] for r in known)
            return sum(r[field] * r["items"] for r in known) / weight if weight else None

        out.append({"length": length, "method": method, "tasks": len(group), "items": items,
                    "agreement": mean("agreement"), "token_agreement": mean("token_agreement"),
                    "exact": mean("exact"), "bytes_per_token": mean("bytes_per_token")})
    return _with_bytes_vs_dense(out, ["length"])
