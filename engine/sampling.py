"""Choosing the next token from logits: greedy, or temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) cut to the top-p mass, seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    def generator(self) -> torch.Generator:
        """A fresh random stream for one generation."""
        return torch.Generator().manual_seed(self.seed)

    def sample(self, logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Next token ids [B] from logits [B, vocab]."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        # On the generator's device (the CPU): the same seed draws the same tokens wherever the model runs.
        probs = torch.softmax(logits.to(gen.device).float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
            before = sorted_probs.cumsum(-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]


GREEDY = Sampler()
