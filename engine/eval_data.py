"""Texts of the accuracy harness: a long real text for perplexity, and passkey prompts.

The long text is the Python documentation's topic pages that every CPython ships (`pydoc_data.topics`,
about 465 KB of English prose and examples): real text, on disk, nothing downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvcache.engine.tokenizer import Tokenizer

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def long_text() -> str:
    """The Python docs' topic pages joined in a fixed order (about 465 KB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt as token ids: the key sits after `depth` of the filler."""

    ids: list[int]
    key: str
    depth: float
    length: int  # tokens
    question_tokens: int  # the question's tokens at the end of `ids` (Star Attention's query, sparse-attention.md §4)


def passkey_prompt(tok: Tokenizer, length: int, depth: float, seed: int) -> PasskeyPrompt:
    """A prompt of about `length` tokens with a random 5-digit key at relative `depth` of the filler.

    Built from token lists of its pieces (intro, whole filler sentences, the key line, the
    question), so prompts of one length share their first tokens up to the key, page for page:
    the store's prefix cache then skips recomputing them.
    """
    key = str(random.Random(seed).randint(10000, 99999))
    intro = tok.encode(PASSKEY_INTRO)
    filler = tok.encode(PASSKEY_FILLER)
    key_line = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    question = tok.encode(PASSKEY_QUESTION)
    n_fill = max(1, (length - len(intro) - len(key_line) - len(question)) // len(filler))
    before = round(n_fill * depth)
    ids = intro + filler * before + key_line + filler * (n_fill - before) + question
    return PasskeyPrompt(ids, key, depth, len(ids), len(question))
