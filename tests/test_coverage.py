"""Coverage telemetry and the dense fallback: every call's estimate of the attention mass its rows cover (SparQ's
alpha, the page methods' softmax mass of the chosen pages, 1 for dense, none for the window), min_coverage's dense
recomputation of the sequences below it, and the stats and Prometheus text that count them. The wire halves (gRPC
and the local data plane) are in test_client_protocol.py and test_observability.py."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.clients.inprocess import AttendCall
from kvcache.clients.sharded import ShardedClient
from kvcache.errors import InvalidParameter
from kvcache.methods.coverage import merged_coverage
from kvcache.methods.gate_model import GateShape, PageGate, block_summaries, gate_logits, gate_select
from kvcache.methods.gate_store import attach_gate
from kvcache.methods.sparq import i1_of, select_rows
from kvcache.service.metrics import prometheus_text

L, HKV, G, D, P = 1, 2, 2, 16, 4
HQ = HKV * G  # GQA: two query heads per kv head
LENGTHS = (23, 14)  # both last pages partly filled
SCALE = 1 / math.sqrt(D)
BACKENDS = ["torch", "triton"]


class Filled:
    """A store holding LENGTHS random positions (and a page gate), the K/V appended [S, Hkv, d], and a query."""

    def __init__(self, seed: int = 0) -> None:
        config = KVCacheConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=P, dtype=torch.float32,
                               device="cpu", device_pages=64)
        self.client = InProcessClient(config)
        self.gate = PageGate(GateShape(L, HKV, G, D, P), seed=1)
        attach_gate(self.client.store, self.gate)
        gen = torch.Generator().manual_seed(seed)
        self.ids, self.k = [], []
        for n in LENGTHS:
            k, v = torch.randn((n, HKV, D), generator=gen), torch.randn((n, HKV, D), generator=gen)
            self.ids.append(self.client.create().seq_id)
            self.client.append(self.ids[-1], k, v, layer=0)
            self.k.append(k)
        self.q = torch.randn((len(LENGTHS), HQ, D), generator=gen)

    def attend(self, method: str, params: dict, backend: str = "torch"):
        return self.client.attend(self.ids, 0, self.q, method, params, backend=backend)


@pytest.fixture(scope="module")
def filled():
    return Filled()


def _groups(q_row: torch.Tensor) -> torch.Tensor:
    return q_row.view(HKV, G, D).float()


def _chosen_share(probs: torch.Tensor, chosen: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sum over each row's first count[h] chosen pages of probs [Hkv, G, n] -> [Hkv, G]."""
    out = torch.zeros(probs.shape[:2])
    for h in range(probs.shape[0]):
        out[h] = probs[h][:, chosen[h, : int(count[h])]].sum(-1)
    return out


# ---- what each method reports ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reallocate", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparq_reports_the_reference_alpha(filled, backend, reallocate):
    r, k, window = 4, 6, 2
    got = filled.attend("sparq", {"r": r, "k": k, "local_window": window, "reallocate": reallocate}, backend)
    for b, S in enumerate(LENGTHS):
        qg = _groups(filled.q[b])
        i1 = i1_of(qg, r)
        keys = filled.k[b].permute(1, 2, 0)  # [Hkv, d, S]: the dim-major reads stage 1 makes
        k_i1 = torch.stack([keys[h, i1[h]] for h in range(HKV)])
        _, alpha = select_rows(qg, k_i1, r, S, k, window, SCALE)
        torch.testing.assert_close(got.coverage[b], alpha.reshape(HQ), rtol=1e-5, atol=1e-6)
    assert got.fallback is None  # no min_coverage asked


@pytest.mark.parametrize("backend", BACKENDS)
def test_quest_reports_the_softmax_mass_of_its_pages_under_its_bounds(filled, backend):
    top = 3
    got = filled.attend("quest", {"top_pages": top}, backend)
    for b, S in enumerate(LENGTHS):
        n = -(-S // P)
        pages = [filled.k[b][i * P : (i + 1) * P].float() for i in range(n)]
        kmax = torch.stack([pg.amax(0) for pg in pages], dim=1)  # [Hkv, n, d]
        kmin = torch.stack([pg.amin(0) for pg in pages], dim=1)
        qg = _groups(filled.q[b])[:, :, None, :]
        bound = torch.maximum(qg * kmax[:, None], qg * kmin[:, None]).sum(-1)  # [Hkv, G, n]
        probs = torch.softmax(bound * SCALE, dim=-1)
        others = torch.topk(probs.sum(1)[:, : n - 1], top - 1).indices  # the last page always, then the best
        chosen = torch.cat((others, torch.full((HKV, 1), n - 1)), dim=1)
        want = _chosen_share(probs, chosen, torch.full((HKV,), top))
        torch.testing.assert_close(got.coverage[b], want.reshape(HQ), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", [{"budget": 8}, {"threshold": 0.2}])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gate_reports_the_softmax_mass_of_its_pages_under_its_logits(filled, backend, params):
    got = filled.attend("gate", params, backend)
    for b in range(len(LENGTHS)):
        summary = block_summaries(filled.k[b].transpose(0, 1), P)
        probs = torch.softmax(gate_logits(filled.gate.layer(0), _groups(filled.q[b]), summary), dim=-1).detach()
        chosen, count = gate_select(probs, P, params.get("budget"), params.get("threshold"))
        want = _chosen_share(probs[:, None, :].expand(HKV, G, -1), chosen, count)  # one choice per group
        torch.testing.assert_close(got.coverage[b], want.reshape(HQ), rtol=1e-5, atol=1e-6)


def test_the_oracle_reports_the_exact_mass_of_its_pages(filled):
    budget = 8
    got = filled.attend("oracle", {"budget": budget})
    for b, S in enumerate(LENGTHS):
        k = filled.k[b].transpose(0, 1).float()  # [Hkv, S, d]
        probs = torch.softmax(torch.einsum("hgd,hsd->hgs", _groups(filled.q[b]), k) * SCALE, dim=-1)
        n = -(-S // P)
        per_page = torch.nn.functional.pad(probs, (0, n * P - S)).view(HKV, G, n, P).sum(-1)
        chosen, count = gate_select(per_page.sum(1), P, budget)
        torch.testing.assert_close(got.coverage[b], _chosen_share(per_page, chosen, count).reshape(HQ),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,params", [("sparq", {"r": 4, "k": 6}), ("quest", {"top_pages": 2}),
                                           ("gate", {"budget": 8}), ("oracle", {"budget": 8})])
def test_sparse_coverage_is_a_share_in_0_1_below_1_when_rows_are_left_out(filled, method, params):
    cov = filled.attend(method, params).coverage
    assert cov.shape == (len(LENGTHS), HQ) and cov.dtype == torch.float32
    assert bool((cov > 0).all()) and bool((cov < 1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_and_sparq_over_every_position_cover_everything(filled, backend):
    assert torch.equal(filled.attend("dense", {}, backend).coverage, torch.ones(len(LENGTHS), HQ))
    got = filled.attend("sparq", {"r": 4, "k": min(LENGTHS)}, backend).coverage
    torch.testing.assert_close(got[1], torch.ones(HQ), rtol=0, atol=1e-5)  # k = S of the shorter sequence
    assert bool((got <= 1).all())


def test_the_window_has_no_estimate_and_refuses_min_coverage(filled):
    assert filled.attend("window", {"window": 4}).coverage is None
    with pytest.raises(InvalidParameter, match="min_coverage"):
        filled.attend("window", {"window": 4, "min_coverage": 0.5})
    with pytest.raises(InvalidParameter, match="min_coverage"):
        filled.attend("sparq", {"r": 4, "k": 6, "min_coverage": 1.5})


# ---- min_coverage -----------------------------------------------------------------------------------------------


def test_min_coverage_zero_never_falls_back(filled):
    for method, params in (("sparq", {"r": 4, "k": 6}), ("quest", {"top_pages": 2})):
        sparse = filled.attend(method, params)
        got = filled.attend(method, {**params, "min_coverage": 0.0})
        assert got.fallback.tolist() == [False, False]
        assert torch.equal(got.out, sparse.out) and got.bytes_read == sparse.bytes_read
        torch.testing.assert_close(got.coverage, sparse.coverage, rtol=0, atol=0)


@pytest.mark.parametrize("method,params,backend", [("sparq", {"r": 4, "k": 6}, "torch"),
                                                   ("sparq", {"r": 4, "k": 6, "reallocate": False}, "triton"),
                                                   ("quest", {"top_pages": 2}, "torch"),
                                                   ("gate", {"budget": 8}, "torch")])
def test_min_coverage_one_recomputes_every_sparse_sequence_densely(filled, method, params, backend):
    sparse = filled.attend(method, params, backend)
    dense = filled.attend("dense", {}, backend)
    got = filled.attend(method, {**params, "min_coverage": 1.0}, backend)
    assert got.fallback.tolist() == [True, True]
    torch.testing.assert_close(got.out, dense.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lse, dense.lse, rtol=1e-5, atol=1e-5)
    assert got.bytes_read == sparse.bytes_read + dense.bytes_read  # what was read: the sparse pass, then dense
    torch.testing.assert_close(got.coverage, sparse.coverage)  # the estimates that made them fall back


def test_dense_never_falls_back(filled):
    got = filled.attend("dense", {"min_coverage": 1.0})
    assert got.fallback.tolist() == [False, False]


def _threshold_between(coverage: torch.Tensor) -> tuple[float, int]:
    """A min_coverage between the two sequences' estimates (their least covered heads') and which one falls."""
    lows = coverage.amin(dim=1).tolist()
    assert lows[0] != lows[1]
    return sum(lows) / 2, lows.index(min(lows))


def test_a_sequence_that_falls_back_leaves_the_others_sparse_output_alone(filled):
    params = {"r": 4, "k": 6}
    sparse = filled.attend("sparq", params)
    dense = filled.attend("dense", {})
    threshold, low = _threshold_between(sparse.coverage)
    got = filled.attend("sparq", {**params, "min_coverage": threshold})
    high = 1 - low
    assert got.fallback.tolist() == [b == low for b in range(2)]
    torch.testing.assert_close(got.out[low], dense.out[low], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lse[low], dense.lse[low], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.out[high], sparse.out[high]) and torch.equal(got.lse[high], sparse.lse[high])
    low_dense = filled.client.attend([filled.ids[low]], 0, filled.q[low:low + 1], "dense")
    assert got.bytes_read == sparse.bytes_read + low_dense.bytes_read


def test_calls_sharing_one_store_call_get_their_own_rows_estimates_and_bytes(filled):
    params = {"r": 4, "k": 6}
    threshold, _ = _threshold_between(filled.attend("sparq", params).coverage)
    params["min_coverage"] = threshold
    calls = [AttendCall([sid], 0, filled.q[b:b + 1], "sparq", params) for b, sid in enumerate(filled.ids)]
    answers, merged = filled.client.attend_many(calls)
    assert merged == [2]
    for b, got in enumerate(answers):
        alone = filled.client.attend([filled.ids[b]], 0, filled.q[b:b + 1], "sparq", params)
        assert torch.equal(got.out, alone.out) and torch.equal(got.coverage, alone.coverage)
        assert got.fallback.tolist() == alone.fallback.tolist() and got.bytes_read == alone.bytes_read


# ---- stats, Prometheus, steps and shards -----------------------------------------------------------------------


def test_stats_and_the_prometheus_text_count_estimates_and_fallbacks_per_method_and_layer():
    f = Filled(seed=3)
    f.attend("sparq", {"r": 4, "k": 6})
    f.attend("sparq", {"r": 4, "k": 6, "min_coverage": 1.0})
    f.attend("window", {"window": 4})  # no estimate: not counted
    got = f.client.stats()["coverage"]
    assert set(got) == {"sparq"}
    entry = got["sparq"][0]
    assert entry["count"] == 4 and entry["fallbacks"] == 2
    lows = f.attend("sparq", {"r": 4, "k": 6}).coverage.amin(dim=1)
    assert entry["sum"] == pytest.approx(2 * float(lows.sum()), rel=1e-6)
    assert entry["mean"] == pytest.approx(entry["sum"] / 4)
    assert entry["buckets"]["1.0"] == 4 and entry["buckets"]["0.5"] == 2 * int((lows <= 0.5).sum())
    text = prometheus_text(f.client.stats())
    assert 'kvcache_attention_coverage_bucket{layer="0",le="+Inf",method="sparq"} 6.0' in text  # three calls now
    assert 'kvcache_attention_coverage_count{layer="0",method="sparq"} 6.0' in text
    assert 'kvcache_attention_fallbacks_total{layer="0",method="sparq"} 2.0' in text


def test_a_begun_step_reports_and_counts_coverage():
    f = Filled(seed=4)
    step = f.client.begin_step(f.ids, HQ, "quest", {"top_pages": 2, "min_coverage": 1.0})
    gen = torch.Generator().manual_seed(5)
    new = torch.randn((2, len(LENGTHS), HKV, D), generator=gen)
    got = step.attend(0, f.q, new[0], new[1])
    assert got.coverage.shape == (len(LENGTHS), HQ) and got.fallback.tolist() == [True, True]
    assert f.client.stats()["coverage"]["quest"][0]["fallbacks"] == 2


def test_over_shards_coverage_merges_by_each_parts_estimated_mass():
    lse = torch.log(torch.tensor([[[2.0]], [[6.0]]]))  # two parts' attended mass, one row, one head
    cover = torch.tensor([[[0.5]], [[0.75]]])  # so their whole masses are 4 and 8
    torch.testing.assert_close(merged_coverage(lse, cover), torch.tensor([[8.0 / 12.0]]))
    config = KVCacheConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=P, dtype=torch.float32, device="cpu",
                           device_pages=64)
    with ShardedClient([InProcessClient(config) for _ in range(2)], block_size=12) as sharded:
        sid = sharded.create().seq_id
        gen = torch.Generator().manual_seed(6)
        sharded.append(sid, torch.randn((23, HKV, D), generator=gen), torch.randn((23, HKV, D), generator=gen), layer=0)
        q = torch.randn((1, HQ, D), generator=gen)
        assert torch.equal(sharded.attend([sid], 0, q).coverage, torch.ones(1, HQ))
        got = sharded.attend([sid], 0, q, "quest", {"top_pages": 2, "min_coverage": 0.0})
        assert bool((got.coverage > 0).all()) and bool((got.coverage < 1).all())
        assert got.fallback.tolist() == [False]
        assert sharded.stats()["coverage"]["quest"][0]["count"] == 2  # one estimate from each shard
