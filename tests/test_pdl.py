"""Programmatic dependent launch (kernels/pdl.py): off wherever it cannot run, and on a Hopper GPU the gate's
decode step launched as a dependent chain gives what the same kernels give launched one after another,
eagerly and replayed in a CUDA graph (where a kernel reading its inputs before they are written would show):
the same pages, and the same attention up to the order the radix select emits them in (it appends with
atomics, so the attention's splits may sum in another order)."""

from __future__ import annotations

import pytest
import torch

import kvcache.methods.gate as gate_kernels
from kvcache.config import KVCacheConfig
from kvcache.kernels.pdl import PDL_MAX_ROWS, pdl_enabled, pdl_for_rows
from kvcache.methods.gate import gate_choose_triton, gate_decode
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate, layer_gate_of
from kvcache.store import KVStore

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_pdl_is_off_on_the_cpu():
    assert not pdl_enabled(torch.device("cpu"))
    assert not pdl_for_rows(torch.device("cpu"), 1)


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of sm_90 or later")
def test_pdl_only_for_small_steps():
    dev = torch.device("cuda")
    assert pdl_enabled(dev)
    assert pdl_for_rows(dev, PDL_MAX_ROWS) and not pdl_for_rows(dev, PDL_MAX_ROWS + 1)


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of sm_90 or later")
@pytest.mark.parametrize("pages", [1500, 5000])  # selection in registers, and the radix launches
def test_the_gate_step_as_a_dependent_chain_equals_it_launched_in_turn(monkeypatch, pages):
    dev = torch.device("cuda")
    P, Hkv, G, d = 16, 8, 4, 128
    lengths = [pages * P - 5]
    config = KVCacheConfig(num_layers=1, num_kv_heads=Hkv, head_dim=d, page_size=P, dtype="bfloat16",
                           device="cuda", device_pages=pages + 8)
    store = KVStore(config)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = []
    for S in lengths:
        seq = store.create().seq_id
        k, v = (torch.randn((1, S, Hkv, d), generator=gen, device=dev).to(torch.bfloat16) for _ in range(2))
        store.append(seq, k, v)
        ids.append(seq)
    attach_gate(store, PageGate(GateShape(1, Hkv, G, d, P)))
    q = torch.randn((1, Hkv * G, d), generator=gen, device=dev).to(torch.bfloat16)
    view, csr, lg = store.layer_view(0), store.page_table(ids, 0), layer_gate_of(store, 0)

    def step():
        return gate_decode(q, view.k_seq, view.v_seq, view.k_summary, lg, csr, budget=4096)[:2]

    def chosen_pages(pdl):
        chosen, count = gate_choose_triton(q, view.k_summary, lg, csr, 4096, pdl=pdl)
        return [sorted(row[:n].tolist()) for row, n in zip(chosen, count.tolist())]

    chained = step()
    chained_pages = chosen_pages(True)
    graph = torch.cuda.CUDAGraph()
    step()  # compiled before capture
    with torch.cuda.graph(graph):
        replayed = step()
    outs = []
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        outs.append([t.clone() for t in replayed])
    monkeypatch.setattr(gate_kernels, "pdl_for_rows", lambda device, rows: False)
    in_turn = step()
    torch.cuda.synchronize()
    assert chained_pages == chosen_pages(False)
    for got in [chained, *outs]:
        torch.testing.assert_close(got[0], in_turn[0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got[1], in_turn[1], rtol=1e-4, atol=1e-4)
