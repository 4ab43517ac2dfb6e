"""A call's parameters given as a byte budget: {"bytes": share} turned into one method's parameters per layer.

A caller who wants "an eighth of dense's bytes" need not know that SparQ reads S*r + 2*k*d elements per head and
Quest its page summaries too: it sends `bytes=0.125`, and each layer runs the method with the parameters its
params_for_share gives at that layer's share (kvcache.methods.byte_allocation) of the batch's shortest length
(so that k or the pages fit every sequence). Parameters sent beside `bytes` (SparQ's local_window, say) override
the derived ones. The reply's bytes_read is what the layer actually read.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from kvcache.errors import InvalidParameter
from kvcache.methods.base import AttentionMethod
from kvcache.methods.byte_allocation import layer_shares

BYTES = "bytes"


def budget_of(params: Mapping[str, Any] | None) -> tuple[float | None, Mapping[str, Any]]:
    """The share asked for by `params` (None: none) and the other parameters given with it."""
    if not params or BYTES not in params:  # every attend call asks: no copy unless there is a budget
        return None, params or {}
    rest = dict(params)
    return rest.pop(BYTES), rest


def budget_params(store, m: AttentionMethod, share: float, given: Mapping[str, Any], layer: int,
                  lens: Sequence[int]) -> dict[str, Any]:
    """Parameters of method `m` that read about the layer's share of dense attention bytes (of `share` over all
    layers) for sequences of `lens` cached positions; InvalidParameter where the method has no rule for it."""
    c = store.config
    context = min(lens)
    floor = least_share(m, context, c.page_size, c.head_dim, c.itemsize)
    layer_share = layer_shares(store if m.follows_allocation else None, share, floor, c.num_layers)[layer]
    p = m.params_for_share(context, layer_share, c.page_size, c.head_dim, c.itemsize)
    if p is None:
        raise InvalidParameter(f"{m.name}: no parameters read {layer_share:.4g} of dense attention's bytes at "
                               f"{context} positions (layer {layer} of a budget of bytes={share})")
    return {**p.given(), **given}


@functools.lru_cache(maxsize=1024)
def least_share(m: AttentionMethod, context: int, page_size: int, head_dim: int, itemsize: int) -> float:
    """About the smallest share of dense bytes `m` has parameters for at `context` positions (1 if none): an
    allocation gives no layer less."""
    lo, hi = 0.0, 1.0
    if m.params_for_share(context, hi, page_size, head_dim, itemsize) is None:
        return 1.0
    for _ in range(20):  # bisection to about 1e-6
        mid = (lo + hi) / 2
        if m.params_for_share(context, mid, page_size, head_dim, itemsize) is None:
            lo = mid
        else:
            hi = mid
    return hi


def resolved_params(store, m: AttentionMethod, params: Mapping[str, Any] | None, layer: int,
                    lens: Sequence[int]) -> Mapping[str, Any] | None:
    """`params` as given, or, if they ask for a byte budget, the parameters it comes to at `layer` and `lens`."""
    share, given = budget_of(params)
    return params if share is None else budget_params(store, m, share, given, layer, lens)
