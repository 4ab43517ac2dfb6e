"""Twin in-process stores for the planned-step tests: the same sequences (one per length) with the same random K/V
in two stores, a page gate attached to both, so one can decode planned and the other per call."""

from __future__ import annotations

import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate


def twin_clients(shape: GateShape, lengths, seed: int = 0, gate_seed: int = 0, device_pages: int = 128):
    """([client, client], [ids, ids]): two float32 CPU stores of `shape` holding the same sequences."""
    L, HKV, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    config = KVCacheConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=shape.page_size,
                           dtype=torch.float32, device="cpu", device_pages=device_pages)
    gate = PageGate(shape, seed=gate_seed)
    clients, ids = [], []
    for _ in range(2):
        client = InProcessClient(config)
        attach_gate(client.store, gate)
        gen = torch.Generator().manual_seed(seed)
        seqs = []
        for n in lengths:
            sid = client.create().seq_id
            client.append(sid, torch.randn((L, n, HKV, D), generator=gen), torch.randn((L, n, HKV, D), generator=gen))
            seqs.append(sid)
        clients.append(client)
        ids.append(seqs)
    return clients, ids
