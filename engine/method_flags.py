"""The decode method and its parameters as `kvcache generate`'s flags: one flag per parameter name of the methods
in the registry (their Params dataclasses), so a new method's parameters are flags with no change here."""

from __future__ import annotations

import argparse
from dataclasses import replace

from kvcache.engine.decode import AttentionSpec, parse_layers
from kvcache.methods import METHODS
from kvcache.methods.base import ParamSpec


def servable() -> list[str]:
    """Methods a decode step may run (evaluation-only ones read every position to choose)."""
    return [name for name, m in METHODS.items() if not m.evaluation_only]


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """--method and one flag per method parameter (--top-pages for top_pages), each saying which methods take it."""
    p.add_argument("--method", choices=servable(), default="dense",
                   help="decode attention method (default dense): " + "; ".join(
                       f"{name}: {METHODS[name].doc}" for name in servable()))
    users: dict[str, tuple[ParamSpec, list[str]]] = {}
    for name in servable():
        for spec in METHODS[name].Params.specs():
            users.setdefault(spec.name, (spec, []))[1].append(name)
    for name, (spec, methods) in users.items():
        flag = "--" + name.replace("_", "-")
        default = spec.cli if spec.cli is not None else spec.default
        text = f"{', '.join(methods)}: {spec.doc}" + ("" if default is None else f" (default {default})")
        if spec.kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=spec.kind, default=None, help=text)
    p.add_argument("--bytes", type=float, default=None,
                   help="a share of dense attention's bytes to read instead of the method's own parameters (e.g. "
                        "0.125): each layer's parameters follow from it at the step's length (docs/methods.md, "
                        "\"Byte budgets\"); dense while the method has none that read so little")


def attention_spec(args: argparse.Namespace, num_layers: int | None = None) -> AttentionSpec:
    """The decode method and its parameters from the flags (--dense-layers checked against `num_layers`)."""
    spec = method_spec(args)
    try:
        dense = parse_layers(getattr(args, "dense_layers", ""), num_layers)
    except ValueError as exc:
        raise SystemExit(f"--dense-layers: {exc}") from None
    return replace(spec, layers=dict.fromkeys(dense, ("dense", {}))) if dense else spec


def method_spec(args: argparse.Namespace) -> AttentionSpec:
    """--method with the flags of its parameters: those given, the command line's defaults for required ones, and
    what the method derives from them (AttentionMethod.from_flags)."""
    m = METHODS[args.method]
    if getattr(args, "bytes", None) is not None:
        given = {spec.name: getattr(args, spec.name) for spec in m.Params.specs()
                 if getattr(args, spec.name, None) is not None}
        return AttentionSpec(m.name, {"bytes": args.bytes, **given})
    values = {}
    for spec in m.Params.specs():
        value = getattr(args, spec.name, None)
        if value is None and spec.required:
            value = spec.cli
        if value is not None:
            values[spec.name] = value
    return AttentionSpec(m.name, m.from_flags(values))


def gate_limits(budget: int | None, threshold: float | None) -> tuple[int | None, float | None]:
    """A gate's (token budget, threshold) from flags: the budget defaults to 2048 tokens when neither is given."""
    given = METHODS["gate"].from_flags({"budget": budget, "threshold": threshold})
    return given["budget"], given["threshold"]
