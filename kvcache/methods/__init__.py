"""Decode attention methods: one object per method (kvcache.methods.registry), their torch references, the lse
merge."""

from kvcache.methods.dense import dense
from kvcache.methods.merge import merge_lse
from kvcache.methods.quest import quest
from kvcache.methods.registry import METHODS, lookup
from kvcache.methods.result import AttentionResult
from kvcache.methods.sparq import sparq

__all__ = ["METHODS", "AttentionResult", "dense", "lookup", "merge_lse", "quest", "sparq"]
