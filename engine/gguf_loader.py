"""Loading a Llama-architecture GGUF file (llama.cpp's format): hyperparameters, tokenizer, dequantized weights.

llama.cpp's converter reorders the rows of every head of the q and k projections so its RoPE
can rotate adjacent pairs (2i, 2i+1); Hugging Face's rotates (i, i + d/2). The loader puts the
rows back in Hugging Face's order, so one model and one RoPE serve GGUF and safetensors alike;
engine/reference.py computes the GGUF layout directly and the tests check the two agree.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import torch

from kvcache.engine.config import ModelConfig
from kvcache.engine.errors import ModelFileError, ModelFileMissing, ModelFileTruncated, UnsupportedModel
from kvcache.engine.model import Llama
from kvcache.engine.tokenizer import Tokenizer
from kvcache.engine.weights import build_model

GGUF_MAGIC = b"GGUF"

# GGUF tensor names -> Hugging Face names ({i} is the layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor name; UnsupportedModel for tensors a Llama does not have."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise UnsupportedModel(f"tensor {gguf_name!r} is not part of a plain Llama (rope scaling, biases, MoE?)")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFModelFile:
    """A GGUF file opened for reading: its metadata as plain values, its tensors dequantized on request."""

    def __init__(self, path: str | os.PathLike) -> None:
        import gguf  # imported here: only loading a GGUF file needs it

        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise ModelFileMissing(f"model file {self.path} does not exist")
        if not self.path.is_file():
            raise ModelFileError(f"model file {self.path} is not a regular file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if len(magic) < 4:
            raise ModelFileTruncated(f"model file {self.path} is truncated: {size} bytes, not even a GGUF header")
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"model file {self.path} is not a GGUF file "
                                 f"(starts with {magic!r}, not {GGUF_MAGIC!r})")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, EOFError, OverflowError) as exc:
            # The reader maps the file and fails when a header, metadata value or tensor runs past its end.
            raise ModelFileTruncated(f"model file {self.path} ({size} bytes) is truncated or corrupt: it ends "
                                     f"before the data its header describes ({exc})") from None
        for t in self.reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ModelFileTruncated(f"model file {self.path} is truncated: tensor {t.name} ends at byte {end}, "
                                         f"the file has {size}")
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture != "llama":
            raise UnsupportedModel(f"{self.path}: architecture {self.architecture!r}; only 'llama' is supported")

    def config(self) -> ModelConfig:
        """Hyperparameters from the llama.* metadata; embeddings are tied when there is no output.weight."""
        m, a = self.metadata, self.architecture
        scaling = m.get(f"{a}.rope.scaling.type", "none")
        if scaling not in ("none", "linear") or m.get(f"{a}.rope.scaling.factor", 1.0) != 1.0:
            raise UnsupportedModel(f"{self.path}: rope scaling {scaling!r} is not implemented")
        try:
            heads = int(m[f"{a}.attention.head_count"])
            hidden = int(m[f"{a}.embedding_length"])
            names = {t.name for t in self.reader.tensors}
            return ModelConfig(
                vocab_size=int(m.get(f"{a}.vocab_size") or len(m["tokenizer.ggml.tokens"])),
                hidden_size=hidden,
                intermediate_size=int(m[f"{a}.feed_forward_length"]),
                num_layers=int(m[f"{a}.block_count"]),
                num_heads=heads,
                num_kv_heads=int(m.get(f"{a}.attention.head_count_kv", heads)),
                head_dim=int(m.get(f"{a}.attention.key_length", hidden // heads)),
                rope_theta=_shortest(m.get(f"{a}.rope.freq_base", 10000.0)),
                rms_norm_eps=_shortest(m[f"{a}.attention.layer_norm_rms_epsilon"]),
                max_position_embeddings=int(m.get(f"{a}.context_length", 2048)),
                tie_word_embeddings="output.weight" not in names,
            )
        except KeyError as exc:
            raise ModelFileError(f"{self.path}: metadata key {exc.args[0]!r} is missing") from None

    def raw_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor dequantized to `dtype`, under its GGUF name and in the GGUF layout ([rows, cols] as torch)."""
        import gguf
        import numpy as np

        out = {}
        for t in self.reader.tensors:
            try:
                values = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise UnsupportedModel(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, "
                                       "which gguf cannot dequantize") from None
            # F32 tensors come back as read-only views of the mapped file: copy them out.
            out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).to(dtype)
        return out

    def tokenizer(self) -> Tokenizer:
        """The tokenizer described by the file's tokenizer.ggml.* metadata."""
        return Tokenizer.from_gguf_metadata(self.metadata)


def _shortest(value: float) -> float:
    """A float32 metadata value as the decimal that was written (1e-5, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def hf_state_dict(config: ModelConfig, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF tensors (names and layout) -> a state dict in Hugging Face names and row order."""
    state = {}
    for name, w in raw.items():
        if name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, config.num_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, config.num_kv_heads)
        state[hf_name(name)] = w
    return state


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer]:
    """The model and tokenizer of a Llama GGUF file, weights dequantized once to `dtype`."""
    f = GGUFModelFile(path)
    config = f.config()
    model = build_model(config, hf_state_dict(config, f.raw_tensors(dtype)), dtype, source=str(f.path))
    return model, f.tokenizer()
