"""Loading a transformers model from local files (a checkpoint directory or a GGUF file), and generating text with it
through a KVCacheCache: what `kvcache generate --hf PATH` runs (docs/transformers.md)."""

from __future__ import annotations

import inspect
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcache.integrations.hf.attention import use_kvcache
from kvcache.integrations.hf.cache import KVCacheCache
from kvcache.integrations.hf.checks import check_supported
from kvcache.integrations.hf.imports import load_transformers


def _where(path: str | pathlib.Path) -> tuple[str, dict[str, Any]]:
    """from_pretrained's directory and keywords for a checkpoint directory or a .gguf file (never the hub)."""
    p = pathlib.Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), {"gguf_file": p.name, "local_files_only": True}
    if p.is_dir():
        return str(p), {"local_files_only": True}
    raise FileNotFoundError(f"{path}: neither a Hugging Face checkpoint directory nor a .gguf file")


def load_hf_model(path: str | pathlib.Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a local checkpoint directory or GGUF file, loaded by transformers and prepared with
    use_kvcache; the model's config is checked (UnsupportedModel) before its weights are read."""
    transformers = load_transformers()
    where, keywords = _where(path)
    check_supported(transformers.AutoConfig.from_pretrained(where, **keywords))
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, **keywords)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **keywords)
    return use_kvcache(model.to(device).eval()), tokenizer


@dataclass
class HFGeneration:
    """What a generate call produced and what it cost."""

    answers: list[str]
    new_tokens: list[int]  # per prompt, up to and including its end token
    prompt_tokens: int  # all prompts, padding excluded
    seconds: float  # the whole generate call: prefill and decode
    totals: dict[str, Any] = field(default_factory=dict)  # the cache's CacheTotals as a dict

    @property
    def tokens_per_second(self) -> float:
        """New tokens of all prompts per second of the generate call."""
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def generate_text(model: Any, tokenizer: Any, cache: KVCacheCache, prompts: Sequence[str], chat: bool = False,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  on_text: Callable[[str], None] | None = None) -> HFGeneration:
    """Answers to `prompts` (a batch, left-padded) by model.generate through `cache`; greedy at temperature 0.
    With one prompt and `on_text`, the answer's text is streamed to it as it comes."""
    texts = list(prompts)
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the last column of every row is its last prompt token
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat,
                       return_token_type_ids=False).to(model.device)
    streamer = None
    if on_text is not None and len(texts) == 1:
        streamer = _streamer(tokenizer, on_text)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(**inputs, **{cache_keyword(model): cache}, max_new_tokens=max_new_tokens,
                         streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling)
    seconds = time.perf_counter() - t0
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = set(_as_list(model.generation_config.eos_token_id))
    counts = [_until_end(row.tolist(), eos) for row in new]
    answers = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, counts)]
    totals = dict(vars(cache.totals), attention_bytes_per_token=cache.totals.attention_bytes_per_token)
    return HFGeneration(answers, counts, int(inputs["attention_mask"].sum()), seconds, totals)


def cache_keyword(model: Any) -> str:
    """The name generate and forward take the cache by: `cache` in transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _until_end(tokens: list[int], eos: set[int]) -> int:
    """Tokens of a row up to and including its first end token (the rest is padding generate added)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
    return len(tokens)


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """transformers' TextStreamer, writing the answer's text to `on_text` instead of stdout."""

    class Streamer(load_transformers().TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
