"""Importing `transformers` from a source checkout of kvcache."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from types import ModuleType

# The checkout's root: its kernels/ folder installs as kvcache.kernels, but run from the root (python -m, pytest) it is
# also the top-level name `kernels`, which is the name of a distribution transformers imports at start-up.
_CHECKOUT = pathlib.Path(__file__).resolve().parents[3]


def _is_checkout(entry: str) -> bool:
    try:
        return pathlib.Path(entry or os.getcwd()).resolve() == _CHECKOUT
    except OSError:
        return False


def load_transformers(submodule: str = "") -> ModuleType:
    """The `transformers` module (or its `submodule`, e.g. "cache_utils"), imported so that the `kernels` distribution
    it needs is not shadowed by the checkout's kernels/ folder; ImportError naming the extra to install if missing."""
    if "transformers" not in sys.modules and "kernels" not in sys.modules:
        spec = importlib.util.find_spec("kernels")
        if spec is not None and spec.origin and pathlib.Path(spec.origin).resolve().is_relative_to(_CHECKOUT):
            saved = list(sys.path)
            sys.path[:] = [entry for entry in saved if not _is_checkout(entry)]
            try:
                importlib.import_module("kernels")
            except ImportError:
                pass  # no such distribution: transformers finds none either and does without it
            finally:
                sys.path[:] = saved
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(f"kvcache.integrations.transformers needs transformers: pip install 'kvcache[transformers]' "
                          f"({exc})") from exc
    return importlib.import_module(f"transformers.{submodule}") if submodule else transformers
