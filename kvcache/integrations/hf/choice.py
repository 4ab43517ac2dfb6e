"""The decode method of a step: the one asked for, its parameters fixed or derived from a share of dense attention's
bytes, fitted to the step's shortest sequence (docs/transformers.md, "Decode")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.methods.registry import lookup


@dataclass(frozen=True)
class MethodChoice:
    """A decode method by name with its parameters (`params`), or with the parameters that read about `share` of dense
    attention's bytes at each step's length (the method's params_for_share rule); layers in `layer_methods` run their
    own (method, params)."""

    method: str = "dense"
    params: Mapping[str, Any] = field(default_factory=dict)
    share: float | None = None
    layer_methods: Mapping[int, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = lookup(self.method)  # InvalidParameter naming the known methods
        if m.evaluation_only:
            raise InvalidParameter(f"{self.method} reads every position to choose: it evaluates, it does not serve")
        if self.share is None:
            m.parse(self.params)  # names and static ranges, checked before any forward runs
        else:
            if self.params:
                raise InvalidParameter("give params or share, not both: share derives the parameters at each step")
            if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 < self.share <= 1:
                raise InvalidParameter(f"share={self.share!r} must be a fraction of dense bytes in (0, 1]")
        for layer, (name, params) in self.layer_methods.items():
            lookup(name).parse(params)
            if not isinstance(layer, int) or layer < 0:
                raise InvalidParameter(f"layer_methods: {layer!r} is not a layer index")

    def for_step(self, shortest: int, store: KVCacheConfig, scale: float | None) -> tuple[str, dict[str, Any]]:
        """Method and parameters for a step whose shortest sequence holds `shortest` positions, the new one included;
        `scale` (None: 1/sqrt(d)) is the model's softmax scale."""
        m = lookup(self.method)
        if self.share is None:
            p = m.parse(self.params)
        else:
            p = m.params_for_share(shortest, self.share, store.page_size, store.head_dim, store.itemsize)
            if p is None:  # no parameters read that little at this length: dense reads all, and says so
                m = lookup("dense")
                p = m.parse({})
        if scale is not None:
            p = replace(p, scale=scale)
        name, fitted = m.fit(p, shortest)  # SparQ, for one, runs dense while a sequence is shorter than its k
        return name, fitted.given()

    def layers_for_step(self, scale: float | None) -> dict[int, tuple[str, dict[str, Any]]]:
        """The layers that run their own method, with the model's softmax scale."""
        extra = {} if scale is None else {"scale": scale}
        return {layer: (name, {**params, **extra}) for layer, (name, params) in self.layer_methods.items()}


def scale_for(scaling: float, head_dim: int) -> float | None:
    """The `scale` parameter for a model's softmax scaling: None where it is the store's default 1/sqrt(d)."""
    return None if math.isclose(scaling, 1.0 / math.sqrt(head_dim), rel_tol=1e-6) else float(scaling)
