"""Loading a Llama-architecture Hugging Face checkpoint: config.json and *.safetensors in one directory."""

from __future__ import annotations

import json
import os
import pathlib

import torch

from kvcache.engine.config import ModelConfig
from kvcache.engine.errors import ModelFileError, ModelFileMissing, ModelFileTruncated
from kvcache.engine.model import Llama
from kvcache.engine.weights import build_model


def read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors of one .safetensors file; ModelFileTruncated when it is cut short."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelFileMissing(f"{path} does not exist")
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ModelFileTruncated(f"{path} ({path.stat().st_size} bytes) is truncated or corrupt: {exc}") from None


def load_safetensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Llama:
    """The Llama of a checkpoint directory (or one of its .safetensors files) holding config.json."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelFileMissing(f"checkpoint {path} does not exist")
    directory = path if path.is_dir() else path.parent
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelFileMissing(f"{config_path} does not exist; a safetensors checkpoint needs its config.json")
    try:
        config = ModelConfig.from_hf(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelFileError(f"{config_path} is not a usable Llama config ({exc!r})") from None
    files = [path] if path.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelFileMissing(f"no .safetensors file in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    return build_model(config, state, dtype, source=str(path))
