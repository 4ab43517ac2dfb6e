"""Tokenizer: byte-level BPE built from a GGUF file's own vocabulary and merges, and chat prompts.

A GGUF file carries its tokenizer as metadata (tokenizer.ggml.tokens / merges / token_type and
the pre-tokenizer's name); this module rebuilds it with the `tokenizers` package, so no
tokenizer file is ever downloaded. Chat prompts are rendered with the file's own Jinja chat
template (ChatML when it has none).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from kvcache.engine.errors import ModelFileMissing, UnsupportedModel

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GGUF token types (llama.cpp's llama_token_type): these are matched whole in the text, never split by BPE.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Llama 3's split rule (GPT-2's, which ByteLevel applies itself, plus digit groups of up to three).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp names `name` (tokenizer.ggml.pre)."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # splits by GPT-2's rule first
    if name in ("default", "gpt2"):
        return gpt2
    if name == "smollm":  # every digit alone, then GPT-2's rule
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if name in ("llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedModel(f"pre-tokenizer {name!r} is not implemented; known: default, gpt2, smollm, llama-bpe")


class Tokenizer:
    """Text <-> token ids, special tokens, stop tokens and the chat template of one model."""

    def __init__(self, backend: HFTokenizer, eos_id: int, bos_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, stop_ids: Sequence[int] = ()) -> None:
        self.backend = backend
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.stop_ids = frozenset({eos_id, *stop_ids})

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """Id of a token given as its vocabulary string (e.g. "<|im_end|>", "Ġthe"), or None."""
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) become their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of token ids."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render_chat(self, messages: Sequence[Mapping[str, str]] | str, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation ([{"role", "content"}] or one user message) by the chat template."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        special = {"bos_token": self._text_of(self.bos_id), "eos_token": self._text_of(self.eos_id)}
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)

    def encode_chat(self, messages: Sequence[Mapping[str, str]] | str) -> list[int]:
        """Token ids of a chat prompt, ending where the assistant's answer begins."""
        ids = self.backend.encode(self.render_chat(messages), add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def prompt_ids(self, prompt: str | Sequence[Mapping[str, str]], chat: bool = False) -> list[int]:
        """Token ids of a prompt: plain text, or a chat (one user message or a list of messages) if `chat`."""
        if chat:
            return self.encode_chat(prompt)
        if not isinstance(prompt, str):
            raise TypeError("a list of messages needs chat=True")
        return self.encode(prompt)

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes (tokenizer.ggml.* and tokenizer.chat_template keys)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModel(f"tokenizer model {kind!r} is not implemented; only byte-level BPE ('gpt2')")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        backend = HFTokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                   if ty == TOKEN_TYPE_CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                if ty == TOKEN_TYPE_USER_DEFINED]
        backend.add_special_tokens(special)
        backend.add_tokens(user)
        eos = int(meta["tokenizer.ggml.eos_token_id"])
        bos = meta.get("tokenizer.ggml.bos_token_id")
        stops = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        if "<|endoftext|>" in tokens:  # the end-of-document token of GPT-2-style vocabularies
            stops.append(tokens.index("<|endoftext|>"))
        return cls(backend, eos, None if bos is None else int(bos), bool(meta.get("tokenizer.ggml.add_bos_token")),
                   meta.get("tokenizer.chat_template"), stops)

    @classmethod
    def from_hf_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        """The tokenizer of a Hugging Face checkpoint directory (tokenizer.json, tokenizer_config.json)."""
        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelFileMissing(f"{path / 'tokenizer.json'} does not exist; the checkpoint needs its tokenizer")
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def token_of(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return None if tok is None else backend.token_to_id(tok)

        eos = token_of("eos_token")
        if eos is None:
            raise UnsupportedModel(f"{cfg_path} names no eos_token in the vocabulary")
        return cls(backend, eos, token_of("bos_token"), bool(cfg.get("add_bos_token", False)),
                   cfg.get("chat_template"))


class StreamDecoder:
    """Turns tokens given one at a time into text pieces, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes (may be empty)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
