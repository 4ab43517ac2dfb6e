"""How a share of dense attention's bytes is spent across layers: uniform, or by a per-model allocation calibrated
once on calibration text (docs/methods.md, "Byte budgets").

A call may ask for `bytes` (a share of what dense attention would read) instead of a method's own parameters. The
share is the mean over layers; each layer's share comes from the store's allocation, if it holds one, and is
then turned into that method's parameters at the batch's length (AttentionMethod.params_for_share).

An allocation holds, per layer, the attention mass the best `f` of a context's positions cover, for fractions f
on a grid, averaged over the calibration text's queries and kv heads (the group's mean probability, as SparQ
ranks). Layers whose attention is spread out lose the most mass when cut; spending the budget where the curves
are steepest (water-filling: each slice of budget to the layer whose coverage it raises most) maximises the mass
covered over all layers at the given mean share. The file (JSON, kvcache/methods/allocations/<name>.json) names
the model shape it was measured on; `kvcache calibrate-bytes` writes it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import weakref
from dataclasses import dataclass

from kvcache.errors import AllocationInvalid, InvalidParameter

FORMAT = "kvcache-byte-allocation/1"
ALLOCATIONS_DIR = pathlib.Path(__file__).resolve().parent / "allocations"
MIN_FACTOR = 0.25  # a layer gets at least this times the mean share...
MAX_FACTOR = 4.0  # ... and at most this times it (and never more than all of dense)
STEPS = 256  # slices of the budget the water-filling hands out


@dataclass(frozen=True)
class ByteAllocation:
    """Coverage curves [layer][i]: the attention mass the top grid[i] of positions cover, per layer."""

    grid: tuple[float, ...]  # fractions of the context in (0, 1], increasing, ending at 1
    coverage: tuple[tuple[float, ...], ...]  # [num_layers][len(grid)], each non-decreasing in [0, 1]
    num_kv_heads: int
    head_dim: int
    model: str = ""
    calibration: str = ""  # what it was measured on (text, contexts, queries)

    def __post_init__(self) -> None:
        g = self.grid
        if not g or any(b <= a for a, b in zip(g, g[1:])) or g[0] <= 0 or abs(g[-1] - 1) > 1e-9:
            raise AllocationInvalid("an allocation's grid must increase from above 0 to 1")
        for layer, row in enumerate(self.coverage):
            if len(row) != len(g) or any(not 0 <= c <= 1 + 1e-6 for c in row):
                raise AllocationInvalid(f"layer {layer}'s coverage must have {len(g)} values in [0, 1]")

    @property
    def num_layers(self) -> int:
        """Layers the allocation covers."""
        return len(self.coverage)

    def covered(self, layer: int, share: float) -> float:
        """Mass the best `share` of positions cover at `layer` (linear between grid points; 0 at share 0)."""
        xs, ys = (0.0, *self.grid), (0.0, *self.coverage[layer])
        share = min(max(share, 0.0), 1.0)
        for i in range(1, len(xs)):
            if share <= xs[i]:
                t = (share - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1]

    def shares(self, share: float, floor: float = 0.0) -> tuple[float, ...]:
        """Each layer's share of dense bytes for a mean of `share` over layers (water-filling of the curves), none
        below `floor` (the least a method can read: SparQ's r components of every key, say)."""
        return _water_fill(self, round(share, 6), math.ceil(floor * 1e6) / 1e6)  # rounded for the cache, not below


@functools.lru_cache(maxsize=256)
def _water_fill(a: ByteAllocation, share: float, floor: float) -> tuple[float, ...]:
    L = a.num_layers
    lo, hi = max(floor, share * MIN_FACTOR), min(1.0, share * MAX_FACTOR)
    if lo >= share:  # no room to move bytes between layers
        return (share,) * L
    out = [lo] * L
    step = (share - lo) * L / STEPS  # the budget above every layer's floor, in equal slices
    for _ in range(STEPS):
        # The slice goes where it covers the most mass; a full layer takes no more.
        # What a layer's share buys above `floor` is positions: the curve is read at the share less the floor.
        gains = [a.covered(i, min(hi, s + step) - floor) - a.covered(i, s - floor) if s < hi else -1.0
                 for i, s in enumerate(out)]
        best = max(range(L), key=gains.__getitem__)
        if gains[best] < 0:
            break
        out[best] = min(hi, out[best] + step)
    return tuple(out)


def uniform_shares(share: float, num_layers: int) -> tuple[float, ...]:
    """The same share in every layer."""
    return (share,) * num_layers


def allocation_path(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A path as given if it names a file (or ends in .json), else kvcache/methods/allocations/<name>.json."""
    p = pathlib.Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        return p
    return ALLOCATIONS_DIR / f"{name_or_path}.json"


def save_allocation(a: ByteAllocation, path: str | os.PathLike) -> pathlib.Path:
    """Write `a` as JSON to `path` (a name resolves under kvcache/methods/allocations/)."""
    path = allocation_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "model": a.model, "calibration": a.calibration, "num_layers": a.num_layers,
           "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "grid": list(a.grid),
           "coverage": [list(row) for row in a.coverage]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_allocation(name_or_path: str | os.PathLike) -> ByteAllocation:
    """The allocation in a file (or kvcache/methods/allocations/<name>.json); AllocationInvalid if it is missing,
    unreadable or malformed."""
    path = allocation_path(name_or_path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AllocationInvalid(f"no readable byte allocation at {path}: {exc}; make one with "
                                "`kvcache calibrate-bytes`") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AllocationInvalid(f"{path} is not a byte allocation (format {FORMAT!r})")
    try:
        a = ByteAllocation(tuple(doc["grid"]), tuple(tuple(r) for r in doc["coverage"]), doc["num_kv_heads"],
                           doc["head_dim"], doc.get("model", ""), doc.get("calibration", ""))
    except (KeyError, TypeError) as exc:
        raise AllocationInvalid(f"{path} lacks a field of a byte allocation: {exc}") from exc
    if a.num_layers != doc.get("num_layers"):
        raise AllocationInvalid(f"{path}: {a.num_layers} coverage rows for num_layers={doc.get('num_layers')}")
    return a


_ALLOCATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> ByteAllocation


def attach_allocation(store, allocation: ByteAllocation | str | os.PathLike) -> ByteAllocation:
    """Give `store` an allocation (an object, a path or a name), checked against its shape; returns it."""
    a = allocation if isinstance(allocation, ByteAllocation) else load_allocation(allocation)
    c = store.config
    have = (a.num_layers, a.num_kv_heads, a.head_dim)
    if have != (c.num_layers, c.num_kv_heads, c.head_dim):
        raise AllocationInvalid(f"the allocation was measured for (layers, kv heads, head dim) {have}; the store "
                                f"holds {(c.num_layers, c.num_kv_heads, c.head_dim)}")
    _ALLOCATIONS[store] = a
    return a


def allocation_of(store) -> ByteAllocation | None:
    """The store's allocation, or None (layers then share a budget uniformly)."""
    return _ALLOCATIONS.get(store)


def layer_shares(store, share: float, floor: float, num_layers: int) -> tuple[float, ...]:
    """Each of `num_layers` layers' share of dense bytes for a mean `share`: by the store's allocation (none below
    `floor`) if it holds one, else (or with no store) uniformly."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise InvalidParameter(f"bytes={share!r} must be a share of dense attention's bytes in (0, 1]")
    a = None if store is None else allocation_of(store)
    return uniform_shares(float(share), num_layers) if a is None else a.shares(float(share), floor)
