"""The KVCacheClient protocol, as a specification both implementations meet.

Every test here talks to `client` only through the protocol (create, fork, free, describe, append,
attend, fetch, stats) and runs four times: against an InProcessClient, and against a RemoteClient
connected to a `kvcache serve` subprocess with the same store config, its layer calls over gRPC and over the
server's local data plane (a Unix socket, service/local_plane.py), and its decode steps leased on a server's shared
page pool (`--share-pool`, service/pool_sessions.py). The two stores live for the
whole module, so tests free what they create (the `seqs` fixture does) and use token ids of their own.
"""

from __future__ import annotations

import contextlib
import math
import secrets

import pytest
import torch
import torch.nn.functional as F
from service_support import STORE, start_servers, stop_servers, store_config

from kvcache.clients.inprocess import InProcessClient, KVCacheClient
from kvcache.clients.remote import RemoteClient
from kvcache.errors import (
    DTypeMismatch,
    InvalidParameter,
    PositionOutOfRange,
    SequenceNotFound,
    ShapeMismatch,
    StoreFull,
)

L, HKV, D, P = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"], STORE["page_size"]
HQ = 2 * HKV  # GQA: two query heads per kv head
CLIENTS = ["in-process", "remote", "shared", "pool"]
SMALL_POOL_PAGES = 8


# ---- clients ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers():
    """`kvcache serve` with the default small store (the config of store_config()), and one whose pool
    holds only SMALL_POOL_PAGES pages; started together."""
    started = start_servers({"main": ((), {}), "small": (("--pages", str(SMALL_POOL_PAGES)), {}),
                             "pooled": (("--share-pool",), {}),
                             "small_pooled": (("--pages", str(SMALL_POOL_PAGES), "--share-pool"), {})})
    yield started
    stop_servers(list(started.values()))


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def remote_client(server):
    with RemoteClient(server.target, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def shared_client(server):
    with RemoteClient(server.target, timeout=20, data_plane="shared") as c:
        yield c


@pytest.fixture(scope="module")
def pool_client(servers):
    with RemoteClient(servers["pooled"].target, timeout=20, data_plane="shared") as c:
        yield c


@pytest.fixture(scope="module")
def in_process_client():
    return InProcessClient(store_config())


@pytest.fixture(params=CLIENTS)
def client(request):
    """The client under test: the same store config in-process and over gRPC."""
    return request.getfixturevalue({"remote": "remote_client", "shared": "shared_client", "pool": "pool_client"}.get(
        request.param, "in_process_client"))


@pytest.fixture(scope="module")
def small_server(servers):
    return servers["small"]


@pytest.fixture(params=CLIENTS)
def small_client(request):
    """A client whose pool holds only SMALL_POOL_PAGES pages."""
    if request.param == "in-process":
        yield InProcessClient(store_config(device_pages=SMALL_POOL_PAGES))
        return
    plane = "grpc" if request.param == "remote" else "shared"
    server = request.getfixturevalue("servers")["small_pooled" if request.param == "pool" else "small"]
    with RemoteClient(server.target, timeout=20, data_plane=plane) as c:
        yield c


class Sequences:
    """Creates and forks through a client, remembering every id so the fixture frees them all."""

    def __init__(self, client) -> None:
        self.client = client
        self.ids: list[str] = []

    def create(self, token_ids=None):
        info = self.client.create(token_ids)
        self.ids.append(info.seq_id)
        return info

    def new(self, length: int = 0, gen: torch.Generator | None = None):
        """A sequence holding `length` random positions in every layer; returns (seq_id, k, v) [L, T, Hkv, d]."""
        seq_id = self.create().seq_id
        k, v = kv(gen or torch.Generator().manual_seed(length), L, length, HKV, D)
        if length:
            self.client.append(seq_id, k, v)
        return seq_id, k, v

    def fork(self, seq_id: str):
        info = self.client.fork(seq_id)
        self.ids.append(info.seq_id)
        return info

    def free_all(self) -> None:
        for seq_id in self.ids:
            with contextlib.suppress(SequenceNotFound):
                self.client.free(seq_id)


@pytest.fixture
def seqs(client):
    s = Sequences(client)
    yield s
    s.free_all()


# ---- helpers ----------------------------------------------------------------------------------------


def kv(gen: torch.Generator, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def unique_token_ids(n: int) -> list[int]:
    """Token ids no other test (or earlier run against the same store) uses."""
    base = secrets.randbelow(2**40) * 1000
    return list(range(base, base + n))


def all_positions(length: int) -> torch.Tensor:
    return torch.arange(length).expand(HKV, length).contiguous()


def read_back(client, seq_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cached position of one layer, fetched as rows: k, v [S, Hkv, d]."""
    S = client.describe(seq_id).lengths[layer]
    if S == 0:
        empty = torch.empty((0, HKV, D))
        return empty, empty
    keys, values = client.fetch(seq_id, layer, "rows", all_positions(S)).tensors
    return keys.transpose(0, 1), values.transpose(0, 1)


def observe(client, seq_id: str) -> dict:
    """Everything a client can see of a sequence: its info and, per layer, rows and value mean."""
    info = client.describe(seq_id)
    seen = {"info": info}
    for layer in range(L):
        seen[f"rows{layer}"] = read_back(client, seq_id, layer)
        if info.lengths[layer]:
            seen[f"mean{layer}"] = client.fetch(seq_id, layer, "value_mean").tensors[0]
    return seen


def assert_same_observation(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    assert after["info"] == before["info"]
    for key in before:
        if key != "info":
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=f"{key} changed")


def assert_holds(client, seq_id: str, k: torch.Tensor, v: torch.Tensor, layer: int | None = None) -> None:
    """The sequence holds exactly k, v ([L, S, Hkv, d], or [S, Hkv, d] for one `layer`)."""
    layers = range(L) if layer is None else [layer]
    for i, layer_idx in enumerate(layers):
        k_ref, v_ref = (k, v) if layer is not None else (k[i], v[i])
        got_k, got_v = read_back(client, seq_id, layer_idx)
        assert torch.equal(got_k, k_ref), f"layer {layer_idx}: keys differ"
        assert torch.equal(got_v, v_ref), f"layer {layer_idx}: values differ"


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact GQA decode attention with torch SDPA: q [Hq, d] over k, v [S, Hkv, d] -> out [Hq, d], lse [Hq]."""
    group = q.shape[0] // k.shape[1]
    keys = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, S, d]
    values = v.transpose(0, 1).repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(q[:, None, :], keys, values)[:, 0]
    lse = torch.logsumexp(torch.einsum("hd,hsd->hs", q, keys) / math.sqrt(q.shape[-1]), dim=-1)
    return out, lse


def pool(client) -> dict:
    return client.stats()["pool"]


# ---- the protocol -----------------------------------------------------------------------------------


def test_client_implements_the_protocol(client):
    assert isinstance(client, KVCacheClient)


def test_create_gives_an_empty_sequence(client, seqs):
    info = seqs.create()
    assert info.lengths == (0,) * L
    assert info.num_pages == 0
    assert info.cached_tokens == 0
    assert client.describe(info.seq_id) == info


def test_each_create_gives_a_new_id(client, seqs):
    ids = {seqs.create().seq_id for _ in range(5)}
    assert len(ids) == 5


def test_free_forgets_the_sequence_and_returns_its_pages(client, seqs):
    free_before = pool(client)["pages_free"]
    seq_id, _, _ = seqs.new(9)
    assert pool(client)["pages_free"] == free_before - 3
    client.free(seq_id)
    assert pool(client)["pages_free"] == free_before
    with pytest.raises(SequenceNotFound):
        client.describe(seq_id)
    with pytest.raises(SequenceNotFound):
        client.free(seq_id)


def test_append_all_layers_across_page_boundaries_reads_back_exactly(client, seqs):
    gen = torch.Generator().manual_seed(1)
    seq_id = seqs.create().seq_id
    ks, vs = [], []
    for T in (3, 5, 6, 1):  # crosses page boundaries mid-chunk and ends on a partial page
        k, v = kv(gen, L, T, HKV, D)
        info = client.append(seq_id, k, v)
        ks.append(k)
        vs.append(v)
        length = sum(x.shape[1] for x in ks)
        assert info.lengths == (length,) * L
        assert info.num_pages == -(-length // P)
    assert_holds(client, seq_id, torch.cat(ks, dim=1), torch.cat(vs, dim=1))


def test_append_one_layer_at_a_time_reads_back_exactly(client, seqs):
    gen = torch.Generator().manual_seed(2)
    seq_id = seqs.create().seq_id
    written = {layer: ([], []) for layer in range(L)}
    total = 0
    for T in (2, 7, 4):
        for layer in range(L):
            k, v = kv(gen, T, HKV, D)
            info = client.append(seq_id, k, v, layer=layer)
            written[layer][0].append(k)
            written[layer][1].append(v)
            assert info.lengths[layer] == total + T
            assert all(n == total for n in info.lengths[layer + 1 :]), "other layers must not move"
        total += T
    for layer, (ks, vs) in written.items():
        assert_holds(client, seq_id, torch.cat(ks), torch.cat(vs), layer=layer)


def test_append_accepts_start_equal_to_the_current_length(client, seqs):
    gen = torch.Generator().manual_seed(3)
    seq_id = seqs.create().seq_id
    k1, v1 = kv(gen, L, 5, HKV, D)
    k2, v2 = kv(gen, L, 3, HKV, D)
    client.append(seq_id, k1, v1, start=0)
    info = client.append(seq_id, k2, v2, start=5)
    assert info.lengths == (8,) * L
    assert_holds(client, seq_id, torch.cat((k1, k2), dim=1), torch.cat((v1, v2), dim=1))


def test_fetch_columns_reads_the_chosen_key_dims_of_every_position(client, seqs):
    seq_id, k, _ = seqs.new(11)
    dims = torch.tensor([[0, 5, 15], [7, 3, 9]])  # [Hkv, r], different per head, unsorted
    for layer in range(L):
        (cols,) = client.fetch(seq_id, layer, "columns", dims).tensors
        assert cols.shape == (HKV, 3, 11)
        for h in range(HKV):
            assert torch.equal(cols[h], k[layer, :, h, dims[h]].T)


def test_fetch_rows_reads_the_chosen_positions(client, seqs):
    seq_id, k, v = seqs.new(14)
    positions = torch.tensor([[13, 0, 5], [2, 2, 9]])  # [Hkv, n]: unsorted, repeated, across pages
    keys, values = client.fetch(seq_id, 1, "rows", positions).tensors
    assert keys.shape == values.shape == (HKV, 3, D)
    for h in range(HKV):
        assert torch.equal(keys[h], k[1, positions[h], h])
        assert torch.equal(values[h], v[1, positions[h], h])


def test_fetch_value_mean_is_the_mean_of_the_cached_values(client, seqs):
    seq_id, _, v = seqs.new(10)
    for layer in range(L):
        (mean,) = client.fetch(seq_id, layer, "value_mean").tensors
        assert mean.shape == (HKV, D) and mean.dtype == torch.float32
        torch.testing.assert_close(mean, v[layer].mean(dim=0), rtol=1e-5, atol=1e-6)


def test_fetch_summaries_are_min_max_mean_of_each_page(client, seqs):
    seq_id, k, _ = seqs.new(10)  # pages of 4, 4 and 2 positions
    for layer in range(L):
        (summaries,) = client.fetch(seq_id, layer, "summaries").tensors
        assert summaries.shape == (3, HKV, 3, D)
        for page in range(3):
            rows = k[layer, page * P : (page + 1) * P]  # [<=P, Hkv, d]
            assert torch.equal(summaries[page, :, 0], rows.amin(dim=0))
            assert torch.equal(summaries[page, :, 1], rows.amax(dim=0))
            torch.testing.assert_close(summaries[page, :, 2], rows.mean(dim=0), rtol=1e-5, atol=1e-6)


def test_fork_starts_with_the_parents_positions(client, seqs):
    parent, k, v = seqs.new(10)
    child = seqs.fork(parent)
    assert child.seq_id != parent
    assert child.lengths == (10,) * L
    assert_holds(client, child.seq_id, k, v)


def test_fork_and_parent_diverge_independently(client, seqs):
    gen = torch.Generator().manual_seed(4)
    parent, k, v = seqs.new(10, gen)  # the last page is partly filled, so both must copy it on write
    child = seqs.fork(parent).seq_id
    kc, vc = kv(gen, L, 5, HKV, D)
    kp, vp = kv(gen, L, 3, HKV, D)
    client.append(child, kc, vc)
    client.append(parent, kp, vp)
    assert client.describe(child).lengths == (15,) * L
    assert client.describe(parent).lengths == (13,) * L
    assert_holds(client, child, torch.cat((k, kc), dim=1), torch.cat((v, vc), dim=1))
    assert_holds(client, parent, torch.cat((k, kp), dim=1), torch.cat((v, vp), dim=1))


def test_fork_outlives_its_freed_parent(client, seqs):
    parent, k, v = seqs.new(9)
    child = seqs.fork(parent).seq_id
    client.free(parent)
    assert_holds(client, child, k, v)


def test_create_with_known_token_ids_reuses_their_full_pages(client, seqs):
    ids = unique_token_ids(13)
    writer = seqs.create().seq_id
    k, v = kv(torch.Generator().manual_seed(5), L, 12, HKV, D)
    client.append(writer, k, v, token_ids=ids[:12])  # 3 full pages, registered by their token ids
    info = seqs.create(ids)
    assert info.cached_tokens == 12
    assert info.lengths == (12,) * L
    assert_holds(client, info.seq_id, k, v)
    (mean,) = client.fetch(info.seq_id, 0, "value_mean").tensors
    torch.testing.assert_close(mean, v[0].mean(dim=0), rtol=1e-5, atol=1e-6)


def test_reused_prefix_grows_like_any_sequence(client, seqs):
    ids = unique_token_ids(9)
    gen = torch.Generator().manual_seed(6)
    writer = seqs.create().seq_id
    k, v = kv(gen, L, 8, HKV, D)
    client.append(writer, k, v, token_ids=ids[:8])
    reader = seqs.create(ids).seq_id
    k_new, v_new = kv(gen, L, 1, HKV, D)
    client.append(reader, k_new, v_new, start=8, token_ids=ids[8:])
    assert_holds(client, reader, torch.cat((k, k_new), dim=1), torch.cat((v, v_new), dim=1))
    assert_holds(client, writer, k, v)


def test_create_with_unknown_token_ids_reuses_nothing(client, seqs):
    ids = unique_token_ids(9)
    writer = seqs.create().seq_id
    client.append(writer, *kv(torch.Generator().manual_seed(7), L, 8, HKV, D), token_ids=ids[:8])
    info = seqs.create([ids[0] + 1] + ids[1:])  # first token differs: no page matches
    assert info.cached_tokens == 0
    assert info.lengths == (0,) * L


# ---- attend -----------------------------------------------------------------------------------------


def test_dense_attend_equals_sdpa_on_the_appended_tensors(client, seqs):
    gen = torch.Generator().manual_seed(8)
    a, ka, va = seqs.new(13, gen)
    b, kb, vb = seqs.new(6, gen)
    q = torch.randn((2, HQ, D), generator=gen)
    for layer in range(L):
        result = client.attend([a, b], layer, q)
        assert result.out.shape == (2, HQ, D) and result.lse.shape == (2, HQ)
        for i, (k, v) in enumerate(((ka, va), (kb, vb))):
            out, lse = sdpa_reference(q[i], k[layer], v[layer])
            torch.testing.assert_close(result.out[i], out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result.lse[i], lse, rtol=1e-5, atol=1e-5)


METHOD_CASES = {
    "dense": ("dense", {}),
    "sparq": ("sparq", {"r": 4, "k": 6, "local_window": 2}),
    "sparq-no-reallocation": ("sparq", {"r": 8, "k": 5, "reallocate": False}),
    "quest": ("quest", {"top_pages": 2}),
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_attend_equals_the_local_torch_reference(client, seqs, case):
    method, params = METHOD_CASES[case]
    gen = torch.Generator().manual_seed(9)
    lengths = (17, 10)
    local = InProcessClient(store_config())  # the torch references, fed identical inputs
    ids, local_ids = [], []
    for n in lengths:
        k, v = kv(gen, L, n, HKV, D)
        ids.append(seqs.create().seq_id)
        client.append(ids[-1], k, v)
        local_ids.append(local.create().seq_id)
        local.append(local_ids[-1], k, v)
    q = torch.randn((len(lengths), HQ, D), generator=gen)
    for layer in range(L):
        got = client.attend(ids, layer, q, method, params)
        want = local.attend(local_ids, layer, q, method, params)
        torch.testing.assert_close(got.out, want.out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.lse, want.lse, rtol=1e-6, atol=1e-6)
        assert got.bytes_read == want.bytes_read


def test_attend_with_new_kv_equals_append_then_attend(client, seqs):
    gen = torch.Generator().manual_seed(10)
    k, v = kv(gen, L, 7, HKV, D)
    fused, stepwise = seqs.create().seq_id, seqs.create().seq_id
    client.append(fused, k, v)
    client.append(stepwise, k, v)
    q = torch.randn((1, HQ, D), generator=gen)
    new_k, new_v = kv(gen, 1, HKV, D)
    got = client.attend([fused], 1, q, new_k=new_k, new_v=new_v)
    client.append(stepwise, new_k, new_v, layer=1)
    want = client.attend([stepwise], 1, q)
    torch.testing.assert_close(got.out, want.out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-6, atol=1e-6)
    assert client.describe(fused).lengths == client.describe(stepwise).lengths == (7, 8)
    assert_holds(client, fused, torch.cat((k[1], new_k)), torch.cat((v[1], new_v)), layer=1)


def test_attend_with_new_kv_appends_to_every_sequence_of_the_batch(client, seqs):
    gen = torch.Generator().manual_seed(11)
    a, ka, va = seqs.new(4, gen)  # a full page: the new token opens a page
    b, kb, vb = seqs.new(6, gen)
    new_k, new_v = kv(gen, 2, HKV, D)
    result = client.attend([a, b], 0, torch.randn((2, HQ, D), generator=gen), new_k=new_k, new_v=new_v)
    assert result.out.shape == (2, HQ, D)
    assert_holds(client, a, torch.cat((ka[0], new_k[:1])), torch.cat((va[0], new_v[:1])), layer=0)
    assert_holds(client, b, torch.cat((kb[0], new_k[1:])), torch.cat((vb[0], new_v[1:])), layer=0)


@pytest.mark.parametrize("method, params", [("dense", None), ("sparq", {"r": 4, "k": 4})])
def test_a_decode_step_begun_once_equals_its_layer_calls_made_one_by_one(client, seqs, method, params):
    gen = torch.Generator().manual_seed(12)
    lengths = [P - 1, 2 * P]  # the steps open a page for one and fill the last of the other
    stepped = [seqs.new(n, torch.Generator().manual_seed(n))[0] for n in lengths]
    by_call = [seqs.new(n, torch.Generator().manual_seed(n))[0] for n in lengths]
    for _ in range(3):
        step = client.begin_step(stepped, HQ, method, params)
        for layer in range(L):
            q = torch.randn((2, HQ, D), generator=gen)
            new_k, new_v = kv(gen, 2, HKV, D)
            got = step.attend(layer, q, new_k, new_v)
            want = client.attend(by_call, layer, q, method, params, new_k=new_k, new_v=new_v)
            torch.testing.assert_close(got.out, want.out, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got.lse, want.lse, rtol=1e-6, atol=1e-6)
    assert [client.describe(s).lengths for s in stepped] == [(n + 3,) * L for n in lengths]
    for a, b in zip(stepped, by_call):
        for layer in range(L):
            rows = torch.arange(lengths[0] + 3).expand(HKV, -1)
            ka, va = client.fetch(a, layer, "rows", rows).tensors
            kb, vb = client.fetch(b, layer, "rows", rows).tensors
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert torch.allclose(client.fetch(a, 0, "value_mean").tensors[0], client.fetch(b, 0, "value_mean").tensors[0])


def test_stats_count_attend_calls_and_their_bytes(client, seqs):
    seq_id, _, _ = seqs.new(12)
    q = torch.randn((1, HQ, D), generator=torch.Generator().manual_seed(12))
    before = client.stats()["methods"]
    results = [client.attend([seq_id], 0, q, "dense") for _ in range(3)]
    results.append(client.attend([seq_id], 1, q, "quest", {"top_pages": 1}))
    after = client.stats()["methods"]

    def delta(method: str, key: str):
        return after[method][key] - before.get(method, {}).get(key, 0)

    assert delta("dense", "calls") == 3
    assert delta("dense", "bytes_read") == sum(r.bytes_read for r in results[:3]) > 0
    assert delta("quest", "calls") == 1
    assert delta("quest", "bytes_read") == results[3].bytes_read > 0
    assert results[3].bytes_read < results[0].bytes_read  # quest read 1 page of 3


def test_attend_reports_coverage_and_the_dense_fallback(client, seqs):
    gen = torch.Generator().manual_seed(13)
    local = InProcessClient(store_config())  # the same calls in-process, fed identical inputs
    ids, local_ids = [], []
    for n in (17, 10):
        k, v = kv(gen, L, n, HKV, D)
        ids.append(seqs.create().seq_id)
        client.append(ids[-1], k, v)
        local_ids.append(local.create().seq_id)
        local.append(local_ids[-1], k, v)
    q = torch.randn((2, HQ, D), generator=gen)
    sparq = {"r": 4, "k": 6}
    lows = local.attend(local_ids, 1, q, "sparq", sparq).coverage.amin(dim=1).tolist()
    cases = [("dense", {}), ("sparq", sparq), ("window", {"window": 4}),
             ("sparq", {**sparq, "min_coverage": sum(lows) / 2}),  # the sequence with the lower estimate falls back
             ("quest", {"top_pages": 2, "min_coverage": 1.0})]
    before = client.stats()["coverage"]
    for method, params in cases:
        got = client.attend(ids, 1, q, method, params)
        want = local.attend(local_ids, 1, q, method, params)
        assert (got.coverage is None) == (want.coverage is None) == (method == "window")
        if want.coverage is not None:
            assert got.coverage.shape == (2, HQ) and got.coverage.dtype == torch.float32
            torch.testing.assert_close(got.coverage, want.coverage, rtol=1e-6, atol=1e-6)
        assert (got.fallback is None) == ("min_coverage" not in params)
        if got.fallback is not None:
            assert got.fallback.dtype == torch.bool and got.fallback.tolist() == want.fallback.tolist()
        torch.testing.assert_close(got.out, want.out, rtol=1e-6, atol=1e-6)
        assert got.bytes_read == want.bytes_read
    assert local.attend(local_ids, 1, q, *cases[3]).fallback.tolist() == [lows[0] < lows[1], lows[1] < lows[0]]
    after = client.stats()["coverage"]

    def counted(method: str, key: str):
        return after[method][1][key] - before.get(method, {}).get(1, {}).get(key, 0)

    assert counted("sparq", "count") == 4 and counted("sparq", "fallbacks") == 1
    assert counted("quest", "count") == 2 and counted("quest", "fallbacks") == 2
    assert counted("dense", "count") == 2
    assert "window" not in after  # no estimate, nothing counted
    assert after["dense"][1]["buckets"]["1.0"] == after["dense"][1]["count"]


def test_stats_count_pages_and_sequences(client, seqs):
    before = pool(client)
    seqs.new(9)  # 3 pages
    after = pool(client)
    assert after["pages_total"] == before["pages_total"]
    assert after["pages_free"] == before["pages_free"] - 3
    assert after["sequences"] == before["sequences"] + 1


# ---- bad input: the same exception class from both clients, and nothing changes -------------------------

UNKNOWN = "0123456789abcdef"  # an id no store made (ids are random)


def _bad_k_shape(c, seq, other, gen):
    c.append(seq, *kv(gen, 2, HKV + 1, D), layer=0)


def _k_v_shapes_differ(c, seq, other, gen):
    c.append(seq, torch.randn(L, 2, HKV, D), torch.randn(L, 3, HKV, D))


def _all_layer_form_without_all_layers(c, seq, other, gen):
    c.append(seq, *kv(gen, L + 1, 2, HKV, D))


def _q_wrong_head_dim(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D + 8))


def _q_wrong_batch(c, seq, other, gen):
    c.attend([seq, other], 0, torch.randn(1, HQ, D))


def _new_k_wrong_shape(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D), new_k=torch.randn(1, HKV, D + 8), new_v=torch.randn(1, HKV, D + 8))


def _append_float16(c, seq, other, gen):
    k, v = kv(gen, L, 2, HKV, D)
    c.append(seq, k.half(), v.half())


def _q_float16(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D).half())


def _append_unknown(c, seq, other, gen):
    c.append(UNKNOWN, *kv(gen, L, 1, HKV, D))


def _attend_unknown_in_batch(c, seq, other, gen):
    c.attend([seq, UNKNOWN], 0, torch.randn(2, HQ, D))


def _attend_new_kv_unknown_in_batch(c, seq, other, gen):
    c.attend([seq, UNKNOWN], 0, torch.randn(2, HQ, D), new_k=torch.randn(2, HKV, D), new_v=torch.randn(2, HKV, D))


def _fetch_unknown(c, seq, other, gen):
    c.fetch(UNKNOWN, 0, "value_mean")


def _fork_unknown(c, seq, other, gen):
    c.fork(UNKNOWN)


def _describe_unknown(c, seq, other, gen):
    c.describe(UNKNOWN)


def _start_ahead(c, seq, other, gen):
    c.append(seq, *kv(gen, L, 1, HKV, D), start=11)


def _start_behind(c, seq, other, gen):
    c.append(seq, *kv(gen, L, 1, HKV, D), start=9)


def _fetch_row_beyond_length(c, seq, other, gen):
    c.fetch(seq, 0, "rows", torch.tensor([[0], [10]]))


def _sparq_r_above_d(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D), "sparq", {"r": D + 1, "k": 4})


def _sparq_k_above_length(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D), "sparq", {"r": 4, "k": 11})


def _unknown_method(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D), "nonexistent")


def _unknown_parameter(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D), "quest", {"top_pages": 2, "bogus": 1})


def _missing_parameter(c, seq, other, gen):
    c.attend([seq], 0, torch.randn(1, HQ, D), "sparq", {"r": 4})


def _layer_out_of_range(c, seq, other, gen):
    c.attend([seq], L, torch.randn(1, HQ, D))


def _new_kv_with_bad_method(c, seq, other, gen):
    # Rejected after the new token would have fit: it must not have been written.
    c.attend([seq], 0, torch.randn(1, HQ, D), "nonexistent", new_k=torch.randn(1, HKV, D),
             new_v=torch.randn(1, HKV, D))


def _unknown_fetch_kind(c, seq, other, gen):
    c.fetch(seq, 0, "everything")


BAD_CALLS = {
    "append k of wrong shape": (_bad_k_shape, ShapeMismatch),
    "append k and v of different shapes": (_k_v_shapes_differ, ShapeMismatch),
    "append all-layer form with L+1 layers": (_all_layer_form_without_all_layers, ShapeMismatch),
    "attend q of wrong head dim": (_q_wrong_head_dim, ShapeMismatch),
    "attend q batch != sequences": (_q_wrong_batch, ShapeMismatch),
    "attend new_k of wrong shape": (_new_k_wrong_shape, ShapeMismatch),
    "append float16 to a float32 store": (_append_float16, DTypeMismatch),
    "attend float16 q": (_q_float16, DTypeMismatch),
    "append to unknown sequence": (_append_unknown, SequenceNotFound),
    "attend batch with unknown sequence": (_attend_unknown_in_batch, SequenceNotFound),
    "attend new kv batch with unknown sequence": (_attend_new_kv_unknown_in_batch, SequenceNotFound),
    "fetch unknown sequence": (_fetch_unknown, SequenceNotFound),
    "fork unknown sequence": (_fork_unknown, SequenceNotFound),
    "describe unknown sequence": (_describe_unknown, SequenceNotFound),
    "append with start past the end": (_start_ahead, PositionOutOfRange),
    "append with start before the end": (_start_behind, PositionOutOfRange),
    "fetch a row past the end": (_fetch_row_beyond_length, PositionOutOfRange),
    "sparq r > d": (_sparq_r_above_d, InvalidParameter),
    "sparq k > S": (_sparq_k_above_length, InvalidParameter),
    "unknown method": (_unknown_method, InvalidParameter),
    "unknown parameter": (_unknown_parameter, InvalidParameter),
    "missing parameter": (_missing_parameter, InvalidParameter),
    "layer out of range": (_layer_out_of_range, InvalidParameter),
    "new kv with unknown method": (_new_kv_with_bad_method, InvalidParameter),
    "unknown fetch kind": (_unknown_fetch_kind, InvalidParameter),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_its_class_and_changes_nothing(client, seqs, case):
    call, error = BAD_CALLS[case]
    gen = torch.Generator().manual_seed(13)
    seq, _, _ = seqs.new(10, gen)
    other, _, _ = seqs.new(7, gen)
    before = {s: observe(client, s) for s in (seq, other)}
    pool_before = pool(client)
    with pytest.raises(error) as excinfo:
        call(client, seq, other, gen)
    assert type(excinfo.value) is error, f"raised {type(excinfo.value).__name__}: {excinfo.value}"
    assert str(excinfo.value), "the error must say what is wrong"
    for s in (seq, other):
        assert_same_observation(before[s], observe(client, s))
    assert pool(client) == pool_before


def test_asking_for_more_pages_than_free_raises_store_full_and_changes_nothing(small_client):
    client = small_client
    gen = torch.Generator().manual_seed(14)
    seqs = Sequences(client)
    try:
        holder, _, _ = seqs.new(5 * P, gen)  # 5 of the 8 pages
        empty = seqs.create().seq_id
        before = {s: observe(client, s) for s in (holder, empty)}
        pool_before = pool(client)
        with pytest.raises(StoreFull) as excinfo:
            client.append(empty, *kv(gen, L, 4 * P, HKV, D))  # 4 pages, 3 free
        assert type(excinfo.value) is StoreFull
        for s in (holder, empty):
            assert_same_observation(before[s], observe(client, s))
        assert pool(client) == pool_before
        info = client.append(empty, *kv(gen, L, 3 * P, HKV, D))  # what fits still fits
        assert info.num_pages == 3
    finally:
        seqs.free_all()


def test_a_decode_step_that_needs_a_page_of_a_full_store_raises_store_full_and_changes_nothing(small_client):
    client = small_client
    gen = torch.Generator().manual_seed(15)
    seqs = Sequences(client)
    try:
        full, _, _ = seqs.new(8 * P, gen)  # every page of the pool, each full
        before = observe(client, full)
        with pytest.raises(StoreFull):
            client.begin_step([full], HQ)
        assert_same_observation(before, observe(client, full))
    finally:
        seqs.free_all()


def test_fork_then_append_raises_store_full_when_copy_on_write_needs_a_page(small_client):
    client = small_client
    gen = torch.Generator().manual_seed(15)
    seqs = Sequences(client)
    try:
        parent, k, v = seqs.new(7 * P + 1, gen)  # all 8 pages, the last one shared after the fork
        child = seqs.fork(parent).seq_id
        with pytest.raises(StoreFull):
            client.append(child, *kv(gen, L, 1, HKV, D))
        assert_holds(client, child, k, v)
        assert_holds(client, parent, k, v)
    finally:
        seqs.free_all()


# ---- RemoteClient with unary Attend (use_stream=False) ------------------------------------------------


@pytest.fixture
def unary_client(server):
    with RemoteClient(server.target, use_stream=False, timeout=20) as c:
        yield c


def test_unary_attend_equals_stream_attend(unary_client, remote_client):
    seqs = Sequences(remote_client)
    try:
        gen = torch.Generator().manual_seed(16)
        a, _, _ = seqs.new(9, gen)
        b, _, _ = seqs.new(14, gen)
        q = torch.randn((2, HQ, D), generator=gen)
        for method, params in METHOD_CASES.values():
            unary = unary_client.attend([a, b], 1, q, method, params)
            stream = remote_client.attend([a, b], 1, q, method, params)
            assert torch.equal(unary.out, stream.out) and torch.equal(unary.lse, stream.lse), method
            assert unary.bytes_read == stream.bytes_read
    finally:
        seqs.free_all()


def test_unary_attend_with_new_kv_appends_once(unary_client):
    seqs = Sequences(unary_client)
    try:
        gen = torch.Generator().manual_seed(17)
        seq_id, k, v = seqs.new(5, gen)
        new_k, new_v = kv(gen, 1, HKV, D)
        q = torch.randn((1, HQ, D), generator=gen)
        got = unary_client.attend([seq_id], 0, q, new_k=new_k, new_v=new_v)
        out, lse = sdpa_reference(q[0], torch.cat((k[0], new_k)), torch.cat((v[0], new_v)))
        torch.testing.assert_close(got.out[0], out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.lse[0], lse, rtol=1e-5, atol=1e-5)
        assert unary_client.describe(seq_id).lengths == (6, 5)
    finally:
        seqs.free_all()


@pytest.mark.parametrize(
    "case",
    ["attend q of wrong head dim", "attend float16 q", "attend batch with unknown sequence",
     "sparq r > d", "unknown method", "unknown parameter"],
)
def test_unary_attend_raises_the_same_classes(unary_client, case):
    call, error = BAD_CALLS[case]
    seqs = Sequences(unary_client)
    try:
        gen = torch.Generator().manual_seed(18)
        seq, _, _ = seqs.new(10, gen)
        other, _, _ = seqs.new(7, gen)
        with pytest.raises(error) as excinfo:
            call(unary_client, seq, other, gen)
        assert type(excinfo.value) is error
    finally:
        seqs.free_all()
