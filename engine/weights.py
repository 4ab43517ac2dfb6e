"""Building a Llama from a state dict in Hugging Face names, with the names and shapes checked first."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvcache.engine.config import ModelConfig
from kvcache.engine.errors import ModelFileError
from kvcache.engine.model import Llama


def build_model(config: ModelConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                source: str = "checkpoint") -> Llama:
    """A Llama of `config` holding `state` (HF names) in `dtype`; ModelFileError names any missing,
    unexpected or misshapen tensor of `source`."""
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Llama(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if config.tie_word_embeddings and unexpected == ["lm_head.weight"]:
        unexpected = []  # some tied checkpoints store the shared matrix twice
    if missing or unexpected:
        raise ModelFileError(f"{source}: tensors missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{n} {tuple(state[n].shape)} (expected {shape})" for n, shape in expected.items()
             if tuple(state[n].shape) != shape]
    if wrong:
        raise ModelFileError(f"{source}: tensors of the wrong shape: {', '.join(wrong[:5])}")
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict({n: state[n].to(dtype) for n in expected}, assign=True)
    return model.eval()
