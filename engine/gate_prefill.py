"""SeerAttention's gate in the engine's prefill (docs/sparse-attention.md §3): each query block reads the key blocks
its gate
picks.

    attention = GatePrefill(kvcache.methods.gate_store.load_gate("smollm2-135m"), budget=2048)
    prefill(model, client, seq_id, ids, attention=attention)     # or generate(..., prefill_attention=attention)

Per chunk and layer, the index comes from the chunk's queries and the prompt's keys so far
(kvcache.prefill.gate_prefill.gate_block_index, blocks of the gate's page size), and attention is
exact on it: the listed pairs' tiles on the CPU, the block-sparse Triton kernel on CUDA
(kvcache.prefill.serving.sparse_attention). Decoding is untouched.
"""

from __future__ import annotations

import time

import torch

from kvcache.engine.prefill import CountedPrefill, PrefillChunk
from kvcache.methods.gate import check_gate_params
from kvcache.methods.gate_model import PageGate
from kvcache.methods.gate_store import check_gate_shape
from kvcache.prefill.gate_prefill import gate_block_index
from kvcache.prefill.serving import index_pairs, paged, sparse_attention


def check_gate_for_model(gate: PageGate, config) -> None:
    """Raise GateFileInvalid unless `gate` was trained for the model of `config` (kvcache.engine.config.ModelConfig):
    its layers, heads and head dim, and for a pre-RoPE gate the RoPE base it rotates q and keys back with."""
    expect = {"num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads,
              "group": config.num_heads // config.num_kv_heads, "head_dim": config.head_dim}
    if gate.shape.pre_rope:
        expect["model_rope_base"] = config.rope_theta
    check_gate_shape(gate.shape, expect, "for this model")


class GatePrefill(CountedPrefill):
    """A chunk-aware prefill attention (kvcache.engine.prefill.PrefillChunk): q [T, Hq, d], k/v [S, Hkv, d]
    -> out [T, Hq, d].

    Counts what it computed (kvcache.engine.prefill.CountedPrefill).
    """

    appends_kv = False

    def __init__(self, gate: PageGate, *, budget: int | None = None, threshold: float | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        check_gate_params(budget, threshold)
        self.gate = gate
        self.budget = budget
        self.threshold = threshold
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        t0 = time.perf_counter()
        start = k.shape[0] - q.shape[0]
        if self.gate.q_weight.device != q.device:
            self.gate = self.gate.to(q.device)  # once: the model (and so q) may live on a GPU
        layer_gate = self.gate.layer(chunk.layer)
        k_seq, v_seq, csr = paged(k, v, self.gate.shape.page_size)
        index = gate_block_index(q, k_seq, csr, start, layer_gate, budget=self.budget, threshold=self.threshold)
        out, _ = sparse_attention(q, k_seq, v_seq, csr, index, backend=self.backend)
        self.count(index_pairs(index), t0)
        return out
