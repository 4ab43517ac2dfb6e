"""Per-head MInference patterns of a model (docs/sparse-attention.md §2), as `kvcache search-patterns` saves them.

    engine/patterns/smollm2-135m.json   {"model": ..., "num_layers": 30, "num_heads": 9, ...,
                                         "layers": [[{"pattern": "vertical_slash", "n_vertical": 50,
                                                      "n_slash": 375, "recall": 0.97, "density": 0.31}, ...], ...]}

`load("smollm2-135m")` finds a saved config by name; `load(path)` reads any file. Saved:
smollm2-135m (the full search: A-shape, vertical-slash, block-sparse) and smollm2-135m-vs
(`--kinds vertical_slash`: the one that keeps passkey retrieval at 4K).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvcache.prefill.serving import CAUSAL, HeadPattern

PATTERNS_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_NAME = "smollm2-135m"  # the engine's default model, SmolLM2-135M-Instruct


@dataclass
class PatternConfig:
    """Each layer's per-query-head patterns, and what the search measured for each (recall, density)."""

    model: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: list[list[HeadPattern]]  # [layer][query head]
    scores: list[list[dict[str, float]]] = field(default_factory=list)  # [layer][head] {"recall": .., "density": ..}
    search: dict[str, Any] = field(default_factory=dict)  # how the search ran (length, candidates, budget, ...)

    def __post_init__(self) -> None:
        if len(self.layers) != self.num_layers or any(len(row) != self.num_heads for row in self.layers):
            raise ValueError(f"pattern config of {self.model}: expected {self.num_layers} layers x {self.num_heads} "
                             f"heads, got {[len(row) for row in self.layers]}")

    @classmethod
    def uniform(cls, model: str, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                pattern: HeadPattern = CAUSAL) -> PatternConfig:
        """Every head of every layer the same pattern (causal: dense prefill through the sparse path)."""
        return cls(model, num_layers, num_heads, num_kv_heads, head_dim,
                   [[pattern] * num_heads for _ in range(num_layers)])

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """ValueError unless the config was searched on a model of this shape."""
        mine = (self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)
        theirs = (num_layers, num_heads, num_kv_heads, head_dim)
        if mine != theirs:
            raise ValueError(f"the patterns of {self.model} are for (layers, heads, kv heads, head dim) = {mine}; "
                             f"the model has {theirs}")

    def counts(self) -> dict[str, int]:
        """Heads per pattern label, e.g. {"vertical_slash(50, 375)": 120, ...}, most common first."""
        return dict(Counter(p.label for row in self.layers for p in row).most_common())

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for i, row in enumerate(self.layers):
            scores = self.scores[i] if i < len(self.scores) else [{}] * len(row)
            layers.append([{**p.to_dict(), **{k: round(v, 5) for k, v in s.items()}} for p, s in zip(row, scores)])
        return {"model": self.model, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "search": self.search,
                "counts": self.counts(), "layers": layers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatternConfig:
        layers = [[HeadPattern.from_dict(h) for h in row] for row in d["layers"]]
        scores = [[{k: float(v) for k, v in h.items() if k in ("recall", "density")} for h in row]
                  for row in d["layers"]]
        return cls(d["model"], int(d["num_layers"]), int(d["num_heads"]), int(d["num_kv_heads"]),
                   int(d["head_dim"]), layers, scores, dict(d.get("search", {})))

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON: one line per layer, so a diff shows which heads changed."""
        d = self.to_dict()
        layers = d.pop("layers")
        text = json.dumps(d, indent=1)[:-2]  # reopen the object to add the layers, one per line
        rows = ",\n".join("  " + json.dumps(row) for row in layers)
        pathlib.Path(path).write_text(f'{text},\n "layers": [\n{rows}\n ]\n}}\n')


def path_of(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A file path as given if it exists, else engine/patterns/<name>.json."""
    path = pathlib.Path(name_or_path)
    if path.exists():
        return path
    saved = PATTERNS_DIR / f"{name_or_path}.json"
    if saved.exists():
        return saved
    known = sorted(p.stem for p in PATTERNS_DIR.glob("*.json"))
    raise FileNotFoundError(f"no pattern config {str(name_or_path)!r}: not a file, and not one of the saved {known} "
                            "(make one with `kvcache search-patterns`)")


def load(name_or_path: str | os.PathLike = DEFAULT_NAME) -> PatternConfig:
    """A saved pattern config by name (engine/patterns/<name>.json) or by path."""
    return PatternConfig.from_dict(json.loads(path_of(name_or_path).read_text()))
