"""Attention methods as plain-torch references; every kernel is tested against these."""

from kvcache.methods.dense import dense
from kvcache.methods.merge import merge_lse
from kvcache.methods.quest import quest
from kvcache.methods.result import AttentionResult
from kvcache.methods.sparq import sparq

__all__ = ["AttentionResult", "dense", "merge_lse", "quest", "sparq"]
