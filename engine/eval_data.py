"""Texts of the accuracy harness: two real texts from different sources, and passkey prompts.

Both texts ship with every CPython install: nothing is downloaded, and each is the same on every call, in any process
of one Python version (the evaluation text parses the stdlib's sources rather than importing them, so nothing another
library wrapped or replaced at import changes it; only its C modules are imported, and they vary by platform).

- Calibration (`calibration_text`): the Python documentation's topic pages (`pydoc_data.topics`, about 465 KB of
  English prose and examples). What `kvcache train-gate` distils a page gate from and `kvcache search-patterns`
  chooses MInference patterns on: anything fitted to a text.
- Evaluation (`evaluation_text`): the docstrings of the standard library's modules, public classes, functions and
  methods (about 1.6 MB on Python 3.11), less every paragraph that shares a long passage with the calibration text.
  What `kvcache eval` scores perplexity on, so no fitted choice is scored on text it was fitted to.
"""

from __future__ import annotations

import ast
import functools
import gc
import importlib
import inspect
import pathlib
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcache.engine.tokenizer import Tokenizer

CALIBRATION_SOURCE = "pydoc_data.topics (the Python documentation's topic pages)"
EVALUATION_SOURCE = ("docstrings of the Python standard library's modules, public classes, functions and methods "
                     "(source files read with ast, C modules with inspect.getdoc), less paragraphs shared with the "
                     "calibration text")

# Standard-library modules the evaluation text leaves out (with their submodules): GUI toolkits, two jokes, the
# calibration text itself, codec tables (their docstrings are one boilerplate line), frozen copies of
# importlib._bootstrap*, and readline (importing it changes the terminal's line editing). Test suites, and C test or
# example modules, are left out by name (_skipped).
EXCLUDED_MODULES = frozenset({
    "idlelib", "tkinter", "_tkinter", "turtle", "turtledemo",
    "antigravity", "this",
    "pydoc_data",
    "encodings",
    "_frozen_importlib", "_frozen_importlib_external",
    "readline",
})
# A paragraph of the evaluation text is dropped when one of its OVERLAP_CHARS-long pieces at offsets 0,
# OVERLAP_CHARS, 2*OVERLAP_CHARS, ... appears in the calibration text: that catches every shared passage of at
# least 2*OVERLAP_CHARS - 1 characters.
OVERLAP_CHARS = 50

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def calibration_text() -> str:
    """The calibration text: the Python docs' topic pages joined in a fixed order (about 465 KB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@functools.lru_cache(maxsize=1)
def evaluation_text() -> str:
    """The evaluation text: stdlib docstrings, each under its qualified name, modules in name order (about 1.6 MB on
    Python 3.11); no paragraph repeated, none sharing a passage of 2*OVERLAP_CHARS - 1 or more characters with the
    calibration text."""
    shared = _char_grams(calibration_text(), OVERLAP_CHARS)
    seen: set[str] = set()
    entries = []
    collecting = gc.isenabled()
    gc.disable()  # syntax trees hold no cycles, yet the collector's passes over them took half the build time
    try:
        documented = _documented_objects()
    finally:
        if collecting:
            gc.enable()
    for name, doc in documented:
        kept = [p for p in _paragraphs(doc) if p not in seen and not _overlaps(p, shared)]
        seen.update(kept)
        if kept:
            entries.append(name + "\n" + "\n\n".join(kept))
    return "\n\n".join(entries)


def _char_grams(text: str, n: int) -> set[str]:
    """Every n-character substring of `text`."""
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def _overlaps(paragraph: str, grams: set[str]) -> bool:
    """Whether a piece of `paragraph` at a multiple of the grams' length is one of `grams`."""
    n = OVERLAP_CHARS
    return any(paragraph[i : i + n] in grams for i in range(0, len(paragraph) - n + 1, n))


def _paragraphs(doc: str) -> list[str]:
    """The blank-line-separated paragraphs of a docstring, stripped, empty ones left out."""
    return [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _documented_objects() -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of every module the text walks, modules in name order: a source module's
    docstring, then its public classes and functions and their public methods and nested classes in source order
    (read with ast: no import, so nothing another library wrapped or replaced leaks in); a C module's docstring, then
    its public classes and routines and their public methods and attributes in name order."""
    sources = _source_modules()
    c_modules = [n for n in sorted(sys.stdlib_module_names) if not _skipped(n) and n.split(".")[0] not in
                 {m.split(".")[0] for m in sources}]
    out: list[tuple[str, str]] = []
    for name in sorted([*sources, *c_modules]):
        out += _source_docs(name, sources[name]) if name in sources else _c_docs(name, set(c_modules))
    return out


def _source_modules() -> dict[str, pathlib.Path]:
    """Module name -> source file of every stdlib module written in Python (packages' submodules included) but the
    excluded and the tests."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = {}
    for top in sorted(sys.stdlib_module_names):
        if _skipped(top):
            continue
        if (lib / f"{top}.py").is_file():
            found[top] = lib / f"{top}.py"
        elif (lib / top / "__init__.py").is_file():
            for path in sorted((lib / top).rglob("*.py")):
                parts = path.relative_to(lib).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                if not any(_skipped(p) for p in parts[1:]):
                    found[".".join(parts)] = path
    return found


def _skipped(name: str) -> bool:
    """Whether a module or package name (one dotted part) is excluded, a test suite or a C test or example module."""
    return (name in EXCLUDED_MODULES or name.startswith(("test", "_test", "xx", "_xx", "__"))
            or name in ("tests", "idle_test", "_ctypes_test"))


def _source_docs(module: str, path: pathlib.Path) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a Python source module and its public definitions, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules' strings
            tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError):  # a file of another Python version's syntax
        return []
    doc = ast.get_docstring(tree)
    return ([(module, doc)] if doc else []) + list(_definitions(tree.body, module))


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the public classes and functions defined in `body` (under if/try/with blocks
    too), each followed by its own class body's."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_"):
                continue
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield name, doc
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node.body, name)
        elif _compound(node):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ExceptHandler):
                    yield from _definitions(child.body, prefix)
            yield from _definitions([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)], prefix)


def _compound(node: ast.AST) -> bool:
    """Whether `node` is a block statement whose body runs where it stands (if, try, with, for, while)."""
    return type(node).__name__ in ("If", "Try", "TryStar", "With", "AsyncWith", "For", "AsyncFor", "While")


def _c_docs(module: str, c_modules: set[str]) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a C module and its public classes and routines, in name order, each with its
    public methods and attributes; a member another C module defines (an alias) is left to that one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modules deprecated for removal (nis, spwd, ossaudiodev)
            mod = importlib.import_module(module)
    except ImportError:  # another platform's module (winreg, msvcrt)
        return []
    out = [(module, inspect.getdoc(mod))]
    for attr, value in sorted(vars(mod).items()):
        owner = getattr(value, "__module__", None)
        if (attr.startswith("_") or not (inspect.isclass(value) or inspect.isroutine(value))
                or inspect.isfunction(value) or (owner != module and owner in c_modules)):
            continue  # private, data, a Python function put there by another library, or an alias
        out.append((f"{module}.{attr}", inspect.getdoc(value)))
        if inspect.isclass(value):
            out += [(f"{module}.{attr}.{name}", inspect.getdoc(member)) for name, member in sorted(vars(value).items())
                    if not name.startswith("_") and (inspect.isroutine(member) or inspect.isdatadescriptor(member))]
    return [(name, doc) for name, doc in out if doc]


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt as token ids: the key sits after `depth` of the filler."""

    ids: list[int]
    key: str
    depth: float
    length: int  # tokens
    question_tokens: int  # the question's tokens at the end of `ids` (Star Attention's query, sparse-attention.md §4)


def passkey_prompt(tok: Tokenizer, length: int, depth: float, seed: int) -> PasskeyPrompt:
    """A prompt of about `length` tokens with a random 5-digit key at relative `depth` of the filler.

    Built from token lists of its pieces (intro, whole filler sentences, the key line, the
    question), so prompts of one length share their first tokens up to the key, page for page:
    the store's prefix cache then skips recomputing them.
    """
    key = str(random.Random(seed).randint(10000, 99999))
    intro = tok.encode(PASSKEY_INTRO)
    filler = tok.encode(PASSKEY_FILLER)
    key_line = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    question = tok.encode(PASSKEY_QUESTION)
    n_fill = max(1, (length - len(intro) - len(key_line) - len(question)) // len(filler))
    before = round(n_fill * depth)
    ids = intro + filler * before + key_line + filler * (n_fill - before) + question
    return PasskeyPrompt(ids, key, depth, len(ids), len(question))
