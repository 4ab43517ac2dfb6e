"""The decode attention methods by name: a new method is one file and one line here."""

from __future__ import annotations

from kvcache.errors import InvalidParameter
from kvcache.methods.base import AttentionMethod
from kvcache.methods.dense import DENSE
from kvcache.methods.gate import GATE
from kvcache.methods.oracle import ORACLE
from kvcache.methods.quest import QUEST
from kvcache.methods.sparq import SPARQ
from kvcache.methods.window import WINDOW

METHODS: dict[str, AttentionMethod] = {m.name: m for m in (DENSE, SPARQ, QUEST, GATE, ORACLE, WINDOW)}


def lookup(name: str) -> AttentionMethod:
    """The method called `name`; InvalidParameter naming the known ones otherwise."""
    if name not in METHODS:
        raise InvalidParameter(f"unknown attention method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
