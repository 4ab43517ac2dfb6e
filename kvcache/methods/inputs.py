"""LayerInputs: what a method may read of the store for one layer call, each read made on first use."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from kvcache.kernels.csr import PageTableCSR
from kvcache.methods.gate_model import LayerGate
from kvcache.methods.gate_store import layer_gate_of
from kvcache.store import KVStore, LayerView
from kvcache.store.row_reads import Moves, read_sequence_keys


class LayerInputs:
    """The batch's page table at one layer and lazy reads of what methods need: the layer's pools (page ids index
    k_dim and k_summary on every store; k_seq/v_seq are indexed by page id only on an untiered store), the value
    means, the store's page gate, and every key of a sequence from whichever tier holds it."""

    def __init__(self, store: KVStore, seq_ids: Sequence[str], layer: int, csr: PageTableCSR,
                 moves: Moves | None = None) -> None:
        self.store = store
        self.seq_ids = list(seq_ids)
        self.layer = layer
        self.csr = csr
        self.moves = moves if moves is not None else Moves(store.tiers)

    @property
    def view(self) -> LayerView:
        """The layer's pool tensors."""
        return self.store.layer_view(self.layer)

    @property
    def num_kv_heads(self) -> int:
        """Hkv."""
        return self.store.config.num_kv_heads

    @property
    def tiered(self) -> bool:
        """Whether pages may sit off the device (k_seq/v_seq then hold device slots, not page ids)."""
        return self.store.tiers is not None

    @cached_property
    def value_mean(self) -> torch.Tensor:
        """Mean value of every sequence [B, Hkv, d] float32."""
        return self.store.value_mean(self.seq_ids, self.layer)

    @cached_property
    def layer_gate(self) -> LayerGate:
        """The store's page gate at this layer (GateMissing if none is attached)."""
        return layer_gate_of(self.store, self.layer)

    def keys(self, b: int) -> torch.Tensor:
        """Every key of sequence b [Hkv, S, d] in the store's dtype, on the device."""
        return read_sequence_keys(self.store, self.layer, self.csr, b, self.moves)
