"""What every decode attention method is: typed parameters, checks, bytes formula, torch reference, selection on
the device, GPU selection, shard rule. A method is one object of one file; kvcache.methods.registry lists them."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvcache.config import KVCacheConfig
from kvcache.errors import InvalidParameter
from kvcache.kernels.csr import PageTableCSR
from kvcache.kernels.tuning import Launch
from kvcache.methods.inputs import LayerInputs
from kvcache.methods.result import AttentionResult

REQUIRED: Any = dataclasses.MISSING
MAX_SCALE = 1e4  # 1/sqrt(d) is below 1; far larger scales overflow float32 scores into NaN


def param(default: Any = REQUIRED, *, doc: str, lo: float | None = None, hi: float | None = None,
          positive: bool = False, cli: Any = None) -> Any:
    """A method parameter: its default (REQUIRED: none), what it means and in which units, its inclusive range
    [lo, hi] (positive: > 0), and the command line's default where it differs (`cli`: a value for a required
    parameter, a rule in words for one that AttentionMethod.from_flags derives). Read by validation, the CLIs'
    flags and the protocol docs."""
    return field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi, "positive": positive, "cli": cli})


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the CLIs and docs show it."""

    name: str
    kind: type  # int, float or bool
    optional: bool  # None is accepted
    required: bool
    default: Any
    doc: str
    lo: float | None
    hi: float | None
    positive: bool
    cli: Any  # the command line's default: a value (required parameters) or the rule from_flags applies


@dataclass(frozen=True, kw_only=True)
class Params:
    """Parameters every method takes; a method's own dataclass adds its fields."""

    scale: float | None = param(None, doc="softmax scale (None: 1/sqrt(d))", positive=True, hi=MAX_SCALE)
    min_coverage: float | None = param(None, doc="least estimated share of attention mass a sequence's rows must "
                                                 "cover, else it is attended densely (None: never)", lo=0, hi=1)

    @classmethod
    def specs(cls) -> list[ParamSpec]:
        """Every field as a ParamSpec, in declaration order."""
        return list(_specs(cls))

    @classmethod
    def parse(cls, method: str, values: Mapping[str, Any] | None) -> Params:
        """The parameters of `values` checked for names, types and static ranges; InvalidParameter naming the
        method otherwise."""
        # Keyed by each value's type too: True == 1 and 4 == 4.0 must not share a cache entry.
        items = tuple((name, type(value), value) for name, value in (values or {}).items())
        try:
            return _parse(cls, method, items)  # a decode step asks with the same values in every layer
        except TypeError:  # an unhashable value: checked (and refused) without the cache
            return cls._parse_uncached(method, dict(values or {}))

    @classmethod
    def _specs_uncached(cls) -> tuple[ParamSpec, ...]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind, optional = _kind(hints[f.name])
            m = f.metadata
            out.append(ParamSpec(f.name, kind, optional, f.default is REQUIRED, None if f.default is REQUIRED
                                 else f.default, m["doc"], m["lo"], m["hi"], m["positive"], m["cli"]))
        return tuple(out)

    @classmethod
    def _parse_uncached(cls, method: str, values: dict[str, Any]) -> Params:
        specs = {s.name: s for s in _specs(cls)}
        unknown = set(values) - set(specs)
        if unknown:
            raise InvalidParameter(f"{method}: unknown parameters {sorted(unknown)}; accepted: {list(specs)}")
        missing = [n for n, s in specs.items() if s.required and n not in values]
        if missing:
            raise InvalidParameter(f"{method}: missing required parameters {missing}")
        for name, value in values.items():
            _check(method, specs[name], value)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every field, defaults included."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def like(self, form: Mapping[str, Any]) -> dict[str, Any]:
        """These parameters in the form `form` was given in: its names, and any field that differs from its default."""
        given = self.given()
        return {k: v for k, v in self.as_dict().items() if k in form or k in given}

    def given(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what a caller needs to send to get these parameters)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.default is REQUIRED or getattr(self, f.name) != f.default}


@functools.cache
def _specs(cls: type[Params]) -> tuple[ParamSpec, ...]:
    # typing.get_type_hints costs tens of microseconds: once per class.
    return cls._specs_uncached()


@functools.lru_cache(maxsize=1024)
def _parse(cls: type[Params], method: str, items: tuple[tuple[str, type, Any], ...]) -> Params:
    return cls._parse_uncached(method, {name: value for name, _, value in items})


def _kind(hint: Any) -> tuple[type, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _check(method: str, spec: ParamSpec, value: Any) -> None:
    if value is None and spec.optional:
        return
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    what = {bool: "a bool", int: "an int", float: "a finite number"}[spec.kind]
    where = []
    if spec.positive:
        where.append("> 0")
    if spec.lo is not None:
        where.append(f">= {spec.lo}")
    if spec.hi is not None:
        where.append(f"<= {spec.hi}")
    if ok and spec.kind is not bool:
        ok = (not spec.positive or value > 0) and (spec.lo is None or value >= spec.lo) and (
            spec.hi is None or value <= spec.hi)
    if not ok:
        rule = what + (" " + " and ".join(where) if where else "") + (" or None" if spec.optional else "")
        raise InvalidParameter(f"{method}: {spec.name}={value!r} must be {rule}")


@dataclass
class Selection:
    """What a method chose to read, per (sequence, kv head) row b*Hkv + h of a batch.

    mode: MODE_DENSE (every position: items is None), MODE_PAGES (items are page indexes within the sequence) or
    MODE_ROWS (items are positions), as kvcache.kernels.paged_decode takes them. Entries of a row past count[row]
    are padding and are not read. alpha [B*Hkv, G] (torch) or alpha_inputs (the GPU's stage-1 statistics) asks for
    mean-value reallocation (docs/sparse-attention.md §1 step 7) after the rows are attended to.

    Coverage (docs/sparse-attention.md, "Coverage"): `estimate` gives the share of attention mass the selection
    covers [B*Hkv, G] float32, called once the attention is launched (its kernels then never sit between the
    selection's and the attention's); coverage_inputs are stage-1 statistics from which the attention kernel sums
    SparQ's alpha for the estimate alone, without reallocation. A selection with neither (and no alpha) has no
    estimate, except MODE_DENSE, which covers everything.
    """

    mode: int
    items: torch.Tensor | None = None  # [B*Hkv, t] int32 or int64
    count: torch.Tensor | None = None  # [B*Hkv] int32; None: every row uses all t
    alpha: torch.Tensor | None = None
    alpha_inputs: tuple[torch.Tensor, ...] | None = None
    estimate: Callable[[], torch.Tensor] | None = None
    coverage_inputs: tuple[torch.Tensor, ...] | None = None
    bytes_read: int | None = None  # set when the bytes depend on the data; else the method's formula
    launch: Launch | None = None  # the attention kernel's launch parameters, if the method tunes them
    pdl: bool = False  # the attention kernels may launch dependent on the selection's (kvcache.kernels.pdl)


class AttentionMethod:
    """One decode attention method. Subclasses set `name` and `Params` and override what differs."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    exact: ClassVar[bool] = True  # parts over disjoint positions merged by lse equal the whole (tiers, shards)
    batchable: ClassVar[bool] = True  # bytes_read follows from lengths: requests may share one store call
    needs_value_mean: ClassVar[bool] = False
    needs_gate: ClassVar[bool] = False  # takes the store's page gate (kvcache.methods.gate_store)
    evaluation_only: ClassVar[bool] = False  # reads every position to choose: a bound, not a way to serve
    # A byte budget follows the store's calibrated allocation (kvcache.methods.byte_allocation) only for methods
    # measured to gain from it; the rest spread it alike over layers.
    follows_allocation: ClassVar[bool] = False
    doc: ClassVar[str] = ""  # one line, for CLIs and docs

    def parse(self, values: Mapping[str, Any] | None) -> Params:
        """Checked parameters from a mapping (wire or keyword form)."""
        return self.Params.parse(self.name, values)

    def check(self, config: KVCacheConfig, lens: Sequence[int], p: Params) -> None:
        """Raise InvalidParameter unless `p` fits a batch of sequences of `lens` cached positions."""

    def bytes_read(self, config: KVCacheConfig, lens: Sequence[int], p: Params) -> int:
        """Bytes one call reads for sequences of `lens` positions (an upper bound where the choice is data-driven)."""
        raise NotImplementedError

    def work_bytes(self, config: KVCacheConfig, lens: Sequence[int], q_heads: int, p: Params) -> int:
        """Bytes of working memory one call needs at most, beyond the store (an estimate from above): the torch path
        works one sequence at a time, so the longest sequence's float32 scores (a few copies) and its K/V gathered
        and upcast, plus the batch's queries and outputs. Methods whose selection builds more override it."""
        S, d, Hkv = max(lens), config.head_dim, config.num_kv_heads
        per_sequence = 3 * q_heads * S * 4 + 2 * Hkv * S * d * (config.itemsize + 4)
        return per_sequence + 3 * len(lens) * q_heads * d * 4

    def reference(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> AttentionResult:
        """The plain-torch reference over an untiered store's layer: what the kernels are tested against."""
        raise NotImplementedError

    def select(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> Selection:
        """What to read, chosen with torch on the store's device (any tier layout)."""
        raise NotImplementedError

    def select_gpu(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> Selection:
        """What to read, chosen by the Triton kernels (no host sync where the method allows); default: select()."""
        return self.select(q, inputs, p)

    def run_cpu(self, q: torch.Tensor, inputs: LayerInputs, p: Params) -> AttentionResult | None:
        """A faster whole path on an untiered CPU store, if the method has one (None: select and attend)."""
        return None

    def shard(self, p: Params, held: Sequence[int], totals: Sequence[int], starts: Sequence[int], is_last: bool,
              page_size: int) -> tuple[str, Params] | None:
        """The method and parameters one shard runs for its rows, or None if it reads nothing there. held: positions
        each row has on the shard; totals: on all shards; starts: the row's positions on the shards before (shards
        hold runs of positions in order, the last the most recent). The last shard, the query host, always runs
        something: it appends the new token. Default: unchanged."""
        return self.name, p

    def fit(self, p: Params, shortest: int) -> tuple[str, Params]:
        """The method and parameters for a step whose shortest sequence holds `shortest` positions. Default: as is."""
        return self.name, p

    def params_for_share(self, context: int, share: float, page_size: int, head_dim: int,
                         itemsize: int) -> Params | None:
        """Parameters that read about `share` of dense attention's bytes at `context` positions of a store with
        pages of `page_size`, heads of `head_dim` and K/V elements of `itemsize` bytes (None: no rule)."""
        return None

    def from_flags(self, values: dict[str, Any]) -> dict[str, Any]:
        """Fill flag defaults that depend on other flags (`kvcache generate`); default: as given."""
        return values


def scale_of(p: Params, d: int) -> float:
    """The softmax scale of `p` for head dim d."""
    return 1.0 / math.sqrt(d) if p.scale is None else p.scale


def csr_rows(csr: PageTableCSR, num_kv_heads: int) -> torch.Tensor:
    """Cached positions of every (sequence, kv head) row [B*Hkv] (int64, on the page table's device)."""
    return csr.seq_lens().repeat_interleave(num_kv_heads)
