"""The gate's Triton decode path (kernels/gate_score.py, kernels/gate.py; docs/sparse-attention.md §3) against the torch
reference (kvcache.methods.gate): gate queries, logits over the page table, the pages chosen by a budget,
and the whole step, on scattered page ids, odd lengths and page boundaries, GQA G in {1, 4, 8},
d in {64, 128}. Runs under TRITON_INTERPRET=1 on the CPU (fp32/fp16) and compiled on a GPU (bf16)."""

from __future__ import annotations

import pytest
import torch
from kernel_support import HKV, INTERPRETED, assert_matches, poisoned_allocations, scattered_store

from kvcache.kernels.gate_score import gate_queries_triton, gate_scores_triton, select_pages
from kvcache.methods.attend import attend
from kvcache.methods.gate import gate, gate_choose_triton, gate_decode
from kvcache.methods.gate_model import GateShape, PageGate, gate_logits, gate_page_scores, gate_queries, gate_select
from kvcache.methods.gate_store import attach_gate, layer_gate_of
from kvcache.methods.gather import gather_sequence

PAGE = 8
LENGTHS = ([1, 8, 9, 77], [130, 41])  # one position, exactly a page, a page and one, odd lengths


# The gate's kinds: on the store's rotated q and summaries, or pre-RoPE (q and keys rotated back with this base).
KINDS = {"rotated": 0.0, "pre_rope": 500.0}


def _setup(lengths, G, d, dtype=torch.float32, gate_dim=32, seed=0, device="cpu", kind="rotated"):
    store, ids = scattered_store(lengths, d=d, page_size=PAGE, dtype=dtype, seed=seed, device=device)
    shape = GateShape(1, HKV, G, d, PAGE, gate_dim=gate_dim, rope_base=50.0, model_rope_base=KINDS[kind])
    g = PageGate(shape, seed=seed + 1)
    with torch.no_grad():
        g.q_bias.normal_(generator=torch.Generator().manual_seed(seed))
    attach_gate(store, g)
    gen = torch.Generator().manual_seed(seed + 2)
    q = torch.randn((len(lengths), HKV * G, d), generator=gen).to(dtype).to(device)
    return store, ids, q


def _keys(store, csr, b):
    """Sequence b's keys [Hkv, S, d] at layer 0: what a pre-RoPE gate's reference pools."""
    return gather_sequence(store.layer_view(0).k_seq, csr, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("G", [1, 3, 4, 8])  # 3: SmolLM2's group, not a power of two
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_gate_queries_and_logits_match_the_reference(G, d, lengths, kind):
    store, ids, q = _setup(lengths, G, d, seed=G + d, kind=kind)
    csr = store.page_table(ids, 0)
    lg = layer_gate_of(store, 0)
    summary = store.layer_view(0).k_summary
    with poisoned_allocations():
        qg = gate_queries_triton(q, lg, csr)
        logits, sel, counts, _ = gate_scores_triton(qg, lg.keys, csr, budget_pages=3)
    for b, S in enumerate(lengths):
        n = -(-S // PAGE)
        qb = q[b].view(HKV, G, d)
        rows = slice(b * HKV, (b + 1) * HKV)
        want_qg = gate_queries(lg, qb, torch.tensor(n - 1), torch.tensor(S - 1))
        torch.testing.assert_close(qg[rows], want_qg, rtol=1e-4, atol=1e-4)
        want = gate_logits(lg, qb, summary[csr.pages_of(b)], _keys(store, csr, b))
        torch.testing.assert_close(logits[rows, :n], want, rtol=1e-4, atol=1e-4)
        assert counts["list_len"][rows].tolist() == [min(n, 3)] * HKV
        assert counts["n_total"][rows].tolist() == [n] * HKV
        # The select key ranks like the logits, with page 0 on top.
        assert sel[rows, 0].isinf().all()
        order = logits[rows, 1:n].argsort(dim=-1)
        assert (sel[rows, 1:n].gather(1, order).diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("select", ["in_registers", "in_registers_many_rows", "radix_levels"])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("budget", [1, PAGE, PAGE + 1, 3 * PAGE, 5 * PAGE - 1, 10_000])
def test_the_chosen_pages_are_the_references(G, budget, select, kind, monkeypatch):
    if select == "radix_levels":  # rows longer than the in-register limits go through kvcache.kernels.topk's levels
        monkeypatch.setattr("kvcache.kernels.topk.ROW_SELECT_MAX", 4)
        monkeypatch.setattr("kvcache.kernels.topk.ROW_SELECT_MAX_MANY", 4)
    if select == "in_registers_many_rows":  # rows past ROW_SELECT_MAX, but enough of them to select in registers
        monkeypatch.setattr("kvcache.kernels.topk.ROW_SELECT_MAX", 4)
        monkeypatch.setattr("kvcache.kernels.topk.ROW_SELECT_MANY_ROWS", 2)
    lengths = [1, 9, 77, 130]
    store, ids, q = _setup(lengths, G, 64, seed=budget, kind=kind)
    csr = store.page_table(ids, 0)
    lg = layer_gate_of(store, 0)
    summary = store.layer_view(0).k_summary
    with poisoned_allocations():
        chosen, list_len = gate_choose_triton(q, summary, lg, csr, budget)
    for b, _S in enumerate(lengths):
        scores = gate_page_scores(lg, q[b].view(HKV, G, 64), summary[csr.pages_of(b)], _keys(store, csr, b))
        ref, count = gate_select(scores, PAGE, budget=budget)
        for h in range(HKV):
            r = b * HKV + h
            assert int(list_len[r]) == int(count[h])
            assert sorted(chosen[r, : list_len[r]].tolist()) == sorted(ref[h, : count[h]].tolist())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_the_gate_step_matches_the_reference(dtype, G, d, kind):
    lengths = [77, 9, 130]
    store, ids, q = _setup(lengths, G, d, dtype=dtype, seed=3 * G + d, kind=kind)
    for params in ({"budget": 3 * PAGE + 1}, {"budget": 5 * PAGE, "threshold": 0.05}):
        ref = attend(store, ids, 0, q, "gate", params, backend="torch")
        with poisoned_allocations():
            got = attend(store, ids, 0, q, "gate", params, backend="triton")
        assert_matches(got.out, got.lse, ref, dtype)
        assert got.bytes_read == ref.bytes_read


@pytest.mark.parametrize("kind", KINDS)
def test_a_gate_without_cached_keys_scores_the_same_pages(kind):
    store, ids, q = _setup([77, 130], 4, 64, kind=kind)
    csr = store.page_table(ids, 0)
    view = store.layer_view(0)
    lg = layer_gate_of(store, 0)
    with_cache = gate_decode(q, view.k_seq, view.v_seq, view.k_summary, lg, csr, budget=33)
    without = gate_decode(q, view.k_seq, view.v_seq, view.k_summary, lg.with_keys(None), csr, budget=33)
    torch.testing.assert_close(with_cache[0], without[0], rtol=1e-6, atol=1e-6)
    ref = gate(q, view.k_seq, view.v_seq, view.k_summary, lg, csr, budget=33)
    torch.testing.assert_close(without[0], ref.out, rtol=1e-5, atol=1e-5)


def test_select_pages_takes_page_zero_the_last_page_and_the_top_keys_between():
    # Hand-built keys: row 0 has 6 pages, row 1 has 3; the best middle pages are 3 and 1 in row 0.
    sel = torch.tensor([[float("inf"), 2.0, 0.5, 3.0, 0.25, 1.0], [float("inf"), 0.1, 7.0, 0, 0, 0]])
    from kvcache.kernels.topk import LEVELS, _histogram_kernel, topk_workspace

    ws = topk_workspace(2, sel.device)
    counts = {"n_valid": torch.tensor([5, 2], dtype=torch.int32), "n_total": torch.tensor([6, 3], dtype=torch.int32),
              "list_len": torch.tensor([4, 3], dtype=torch.int32)}
    shift, bits = LEVELS[0]
    _histogram_kernel[(2, 1)](sel, counts["n_valid"], ws["hist0"], 8, sel.stride(0), BLOCK=8, SHIFT=shift,
                              NBINS=1 << bits, PDL=False)
    out = select_pages(sel, counts, ws, k_max=4)
    assert sorted(out[0].tolist()) == [0, 1, 3, 5]
    assert sorted(out[1, :3].tolist()) == [0, 1, 2]
    in_registers = select_pages(sel, counts, {}, k_max=4)
    assert in_registers[0].tolist() == [0, 1, 3, 5]  # one program per row emits them in page order
    assert in_registers[1, :3].tolist() == [0, 1, 2]
    counts["list_len"] = torch.tensor([1, 2], dtype=torch.int32)  # the last page alone; page 0 and the last
    in_registers = select_pages(sel, counts, {}, k_max=4)
    assert in_registers[0, :1].tolist() == [5] and in_registers[1, :2].tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(4))
def test_select_in_registers_takes_the_top_keys_and_the_first_ties(seed):
    # Keys from a handful of values, so most of the choice falls on exact ties (the bisection's last bin).
    gen = torch.Generator().manual_seed(seed)
    width, rows = 37, 6
    sel = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e-30, 3e38])[torch.randint(0, 6, (rows, width), generator=gen)]
    sel[:, 0] = float("inf")
    n_valid = torch.tensor([36, 36, 20, 5, 1, 0], dtype=torch.int32)
    list_len = torch.tensor([12, 37, 7, 6, 1, 1], dtype=torch.int32)  # all, some, none but the last page
    counts = {"n_valid": n_valid, "n_total": n_valid + 1, "list_len": list_len}
    out = select_pages(sel, counts, {}, k_max=width)
    for r in range(rows):
        n, need = int(n_valid[r]), int(list_len[r]) - 1
        keys = sel[r, :n].tolist()
        # The reference: the largest keys, exact ties in page order, then the last page.
        want = sorted(sorted(range(n), key=lambda i: (-keys[i], i))[:need]) + [n]
        assert out[r, : list_len[r]].tolist() == want


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="bf16 needs compiled kernels on a GPU")
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_the_gate_step_on_cuda_bfloat16_matches_the_reference(G, d, kind):
    lengths = [77, 9, 400]  # 64 of the store's 128 pages, beside the fillers
    store, ids, q = _setup(lengths, G, d, dtype=torch.bfloat16, seed=G + d, device="cuda", gate_dim=128, kind=kind)
    csr = store.page_table(ids, 0)
    lg = layer_gate_of(store, 0)
    summary = store.layer_view(0).k_summary
    qg = gate_queries_triton(q, lg, csr)
    logits, _, _, _ = gate_scores_triton(qg, lg.keys, csr, budget_pages=4)
    for b, S in enumerate(lengths):
        n = -(-S // PAGE)
        want = gate_logits(lg, q[b].view(HKV, G, d), summary[csr.pages_of(b)], _keys(store, csr, b))
        # The cache holds the keys in bf16: logits agree to its rounding.
        torch.testing.assert_close(logits[b * HKV : (b + 1) * HKV, :n], want, rtol=2e-2, atol=2e-2)
    # With the cache's own keys the choice is the reference's: the step equals exact attention over it.
    ref = attend(store, ids, 0, q, "gate", {"budget": 3 * PAGE + 1}, backend="torch")
    got = attend(store, ids, 0, q, "gate", {"budget": 3 * PAGE + 1}, backend="triton")
    assert got.bytes_read == ref.bytes_read
    assert not got.out.isnan().any()
    covering = attend(store, ids, 0, q, "gate", {"budget": 10**6}, backend="triton")
    dense = attend(store, ids, 0, q, "dense", backend="triton")
    assert_matches(covering.out, covering.lse, dense, torch.bfloat16)
