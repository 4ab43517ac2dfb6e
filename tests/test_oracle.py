"""The oracle page choice (kvcache.methods.oracle): the pages with the most true attention mass, then exact
attention."""

import math

import pytest
import torch
from kernel_support import HKV, scattered_store

from kvcache import InvalidParameter
from kvcache.methods import dense
from kvcache.methods.attend import attend
from kvcache.methods.oracle import oracle, page_attention_mass

G, D, P = 4, 32, 8


def _store(lengths, seed=0):
    store, ids = scattered_store(lengths, d=D, page_size=P, seed=seed)
    q = torch.randn((len(ids), HKV * G, D), generator=torch.Generator().manual_seed(seed + 1))
    return store, ids, q


def test_a_budget_over_every_page_is_dense():
    store, ids, q = _store((37, 11, 61))
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    got, want = oracle(q, view.k_seq, view.v_seq, csr, budget=64), dense(q, view.k_seq, view.v_seq, csr)
    torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-5, atol=1e-5)
    assert got.bytes_read == want.bytes_read


def test_the_chosen_pages_are_those_with_the_most_mass_as_written_out():
    store, ids, q = _store((61, 45), seed=4)
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    budget = 3 * P  # first, last and the best page between
    got = oracle(q, view.k_seq, view.v_seq, csr, budget=budget)
    scale = 1 / math.sqrt(D)
    rows_read = 0
    for b, S in enumerate(csr.host_lens):
        n = -(-S // P)
        k = torch.cat([view.k_seq[p] for p in csr.pages_of(b).tolist()], dim=1)[:, :S]  # [Hkv, S, d]
        v = torch.cat([view.v_seq[p] for p in csr.pages_of(b).tolist()], dim=1)[:, :S]
        for h in range(HKV):
            qh = q[b, h * G : (h + 1) * G]  # [G, d]
            probs = torch.softmax(qh @ k[h].T * scale, dim=-1)  # [G, S]
            mass = [float(probs[:, i * P : (i + 1) * P].sum()) for i in range(n)]
            best = max(range(1, n - 1), key=lambda i: mass[i])
            keep = torch.zeros(S, dtype=torch.bool)
            for page in (0, best, n - 1):
                keep[page * P : (page + 1) * P] = True
            logits = (qh @ k[h].T * scale).masked_fill(~keep, float("-inf"))
            lse = torch.logsumexp(logits, -1)
            out = torch.exp(logits - lse[:, None]) @ v[h]
            torch.testing.assert_close(got.out[b, h * G : (h + 1) * G], out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.lse[b, h * G : (h + 1) * G], lse, rtol=1e-5, atol=1e-5)
            rows_read += int(keep.sum())
    assert got.bytes_read == 2 * rows_read * D * 4  # K and V rows of the chosen pages, float32


def test_page_mass_sums_to_the_group_size_and_pads_the_last_page():
    q, k = torch.randn(2, G, D), torch.randn(2, 21, D)
    mass = page_attention_mass(q, k, P, 0.2)
    assert mass.shape == (2, 3)
    torch.testing.assert_close(mass.sum(-1), torch.full((2,), float(G)))


@pytest.mark.parametrize("budget", [0, -8, 2.5, True, None])
def test_a_bad_budget_is_refused(budget):
    store, ids, q = _store((20,))
    with pytest.raises(InvalidParameter, match="budget"):
        attend(store, ids, 0, q, "oracle", {"budget": budget})


def test_attend_runs_the_oracle_by_name_with_its_bytes():
    store, ids, q = _store((40, 9))
    result = attend(store, ids, 0, q, "oracle", {"budget": 2 * P})
    assert result.bytes_read == 2 * D * 4 * HKV * ((P + 40 - 4 * P) + 9)  # 40: pages 0 and 4 (8 rows); 9: all


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_oracle_runs_the_reference_on_the_device():
    store, ids, q = _store((40, 9))
    gpu, gpu_ids = scattered_store((40, 9), d=D, page_size=P, device="cuda")
    want = attend(store, ids, 0, q, "oracle", {"budget": 2 * P})
    got = attend(gpu, gpu_ids, 0, q.cuda(), "oracle", {"budget": 2 * P})
    torch.testing.assert_close(got.out.cpu(), want.out, rtol=1e-4, atol=1e-4)
    assert got.bytes_read == want.bytes_read
