"""The CPU path of dense attention (kvcache.methods.dense.dense_cpu: the pool read in place, page runs merged by lse)
against the plain torch reference."""

import pytest
import torch
from kernel_support import HKV, assert_matches, poisoned_allocations, scattered_store

from kvcache.methods import dense
from kvcache.methods.dense import dense_cpu, page_runs

CASES = [  # (lengths, head_dim, page size, G): odd lengths, partly filled and exactly full last pages
    ((37, 11, 61), 64, 8, 4),
    ((1,), 64, 8, 1),
    ((16, 17, 15), 32, 16, 8),
    ((100, 3), 128, 4, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("lengths", "d", "page_size", "G"), CASES)
def test_dense_cpu_equals_the_reference(lengths, d, page_size, G, dtype):
    store, ids = scattered_store(lengths, d=d, page_size=page_size, dtype=dtype, seed=len(lengths) + d)
    q = torch.randn((len(ids), HKV * G, d), generator=torch.Generator().manual_seed(d)).to(dtype)
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    reference = dense(q, view.k_seq, view.v_seq, csr)
    with poisoned_allocations():
        got = dense_cpu(q, view.k_seq, view.v_seq, csr)
    assert_matches(got.out, got.lse, reference, dtype)
    assert got.bytes_read == reference.bytes_read


def test_a_scale_is_applied_as_the_reference_applies_it():
    store, ids = scattered_store((29, 8), d=64, page_size=8, dtype=torch.float32, seed=3)
    q = torch.randn((2, HKV * 3, 64), generator=torch.Generator().manual_seed(4))
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    reference = dense(q, view.k_seq, view.v_seq, csr, scale=0.3)
    got = dense_cpu(q, view.k_seq, view.v_seq, csr, scale=0.3)
    assert_matches(got.out, got.lse, reference, torch.float32)


def test_page_runs_split_a_page_list_where_ids_stop_being_consecutive():
    assert page_runs([]) == []
    assert page_runs([7]) == [(7, 1)]
    assert page_runs([3, 4, 5, 9, 10, 2, 8, 9]) == [(3, 3), (9, 2), (2, 1), (8, 2)]


def test_bench_dense_cpu_reports_both_paths(tmp_path):
    import json

    from kvcache.cli import main

    out = tmp_path / "dense_cpu.json"
    assert main(["bench", "dense-cpu", "--context", "40", "--iters", "1", "--dtypes", "float32",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["context"]) for r in rows] == [("SmolLM2-135M", 40), ("Llama-3-8B", 40)]
    assert all(r["cpu_path_ms"] > 0 and r["speedup"] == r["reference_ms"] / r["cpu_path_ms"] for r in rows)
