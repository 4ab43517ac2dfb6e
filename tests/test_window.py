"""The window method (StreamingLLM: attention sinks plus a recent window) everywhere a method runs: its reference,
the torch and Triton paths, a tiered store, sharded over stores, over gRPC, `kvcache generate` and `kvcache eval`."""

from __future__ import annotations

import json

import pytest
import torch
from eval_support import use_model
from kernel_support import HKV, assert_matches, scattered_store
from service_support import DEFAULT_STORE_FLAGS, STORE, serving, store_config
from test_engine_gguf import run_generate, tiny  # noqa: F401 (a fixture)
from test_star_eval import model  # noqa: F401 (a fixture)

from kvcache import InProcessClient, InvalidParameter, KVCacheConfig, RemoteClient
from kvcache.clients.sharded import ShardedClient, shard_budget
from kvcache.methods import METHODS, dense
from kvcache.methods.attend import attend
from kvcache.methods.window import window_attention, window_bytes, window_positions

D, P = 16, 4


def _batch(lengths, G=2, dtype=torch.float32, seed=0):
    store, ids = scattered_store(lengths, d=D, page_size=P, dtype=dtype, seed=seed)
    q = torch.randn((len(ids), HKV * G, D), generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return store, ids, q


def test_positions_are_the_sinks_then_the_window_or_all_where_they_meet():
    positions, count = window_positions(torch.tensor([3, 10, 6, 7]), sinks=2, window=4)
    assert count.tolist() == [3, 6, 6, 6]
    assert positions[0, :3].tolist() == [0, 1, 2]
    assert positions[1].tolist() == [0, 1, 6, 7, 8, 9]
    assert positions[2].tolist() == [0, 1, 2, 3, 4, 5]
    assert positions[3].tolist() == [0, 1, 3, 4, 5, 6]


def test_a_window_covering_every_position_is_dense():
    store, ids, q = _batch([9, 13, 4])
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    got = window_attention(q, view.k_seq, view.v_seq, csr, window=13, sinks=0)
    want = dense(q, view.k_seq, view.v_seq, csr)
    torch.testing.assert_close(got.out, want.out)
    torch.testing.assert_close(got.lse, want.lse)
    assert got.bytes_read == want.bytes_read


def test_bytes_are_the_rows_of_the_sinks_and_the_window():
    assert window_bytes([100, 5], num_kv_heads=2, d=16, itemsize=2, sinks=4, window=8) == \
        (2 * 12 * 16 * 2 + 2 * 5 * 16 * 2) * 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("G, lengths, sinks, window", [
    (1, (37, 11, 61), 4, 9),  # odd lengths, partial last pages, a short row read whole
    (4, (8, 16, 33), 0, 5),  # page boundaries, no sinks, GQA
    (2, (5, 40), 3, 1),
])
def test_both_paths_equal_the_reference(backend, G, lengths, sinks, window):
    store, ids, q = _batch(lengths, G)
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    ref = window_attention(q, view.k_seq, view.v_seq, csr, window=window, sinks=sinks)
    got = attend(store, ids, 0, q, "window", {"window": window, "sinks": sinks}, backend=backend)
    assert_matches(got.out, got.lse, ref, torch.float32)
    assert got.bytes_read == ref.bytes_read


def test_float16_on_the_triton_path_matches_the_reference():
    store, ids, q = _batch((29, 70), G=2, dtype=torch.float16)
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    ref = window_attention(q, view.k_seq, view.v_seq, csr, window=12)
    got = attend(store, ids, 0, q, "window", {"window": 12}, backend="triton")
    assert_matches(got.out, got.lse, ref, torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 through the compiled kernels is checked on a GPU")
def test_bfloat16_on_the_gpu_matches_the_reference():
    lengths = (300, 529, 70)
    store, ids = scattered_store(lengths, d=128, page_size=16, dtype=torch.bfloat16, device="cuda")
    q = torch.randn((len(ids), HKV * 4, 128), device="cuda").to(torch.bfloat16)
    view, csr = store.layer_view(0), store.page_table(ids, 0)
    ref = window_attention(q, view.k_seq, view.v_seq, csr, window=100, sinks=4)
    got = attend(store, ids, 0, q, "window", {"window": 100}, backend="triton")
    assert_matches(got.out, got.lse, ref, torch.bfloat16)


@pytest.mark.parametrize("params", [{}, {"window": -1}, {"window": 0, "sinks": 0}, {"window": 4, "sinks": 1.5},
                                    {"window": 4, "extra": 1}])
def test_bad_parameters_are_refused(params):
    store, ids, q = _batch((9,))
    with pytest.raises(InvalidParameter):
        attend(store, ids, 0, q, "window", params)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_on_a_tiered_store_it_equals_a_plain_store_and_moves_only_the_rows_it_reads(tmp_path, backend):
    shape = {"num_layers": 1, "num_kv_heads": HKV, "head_dim": D, "page_size": P, "dtype": torch.float32,
             "device": "cpu"}
    plain = InProcessClient(KVCacheConfig(**shape, device_pages=64))
    tiered = InProcessClient(KVCacheConfig(**shape, device_pages=4, host_pages=8, disk_pages=16,
                                           disk_path=str(tmp_path), pinned_tail_pages=1))
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn((1, 50, HKV, D), generator=gen), torch.randn((1, 50, HKV, D), generator=gen)
    a, b = plain.create().seq_id, tiered.create().seq_id
    plain.append(a, k, v)
    tiered.append(b, k, v)
    q = torch.randn((1, HKV * 2, D), generator=gen)
    params = {"window": 6, "sinks": 2}
    want = plain.attend([a], 0, q, "window", params, backend=backend)
    got = tiered.attend([b], 0, q, "window", params, backend=backend)
    torch.testing.assert_close(got.out, want.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-5, atol=1e-5)
    assert got.bytes_read == want.bytes_read
    assert 0 < sum(got.bytes_moved.values()) <= 2 * 8 * HKV * P * D * 4  # at most the two pages of each part


def test_sharded_over_stores_it_equals_one_store():
    gen = torch.Generator().manual_seed(6)
    one = InProcessClient(store_config())
    with ShardedClient([InProcessClient(store_config()) for _ in range(3)], block_size=16) as sharded:
        a, b = one.create().seq_id, sharded.create().seq_id
        k, v = torch.randn((2, 41, 2, 16), generator=gen), torch.randn((2, 41, 2, 16), generator=gen)
        one.append(a, k, v)
        sharded.append(b, k, v)  # 16 + 16 + 9 positions
        q = torch.randn((1, 4, 16), generator=gen)
        for params in ({"window": 5, "sinks": 3}, {"window": 20, "sinks": 18}, {"window": 9, "sinks": 0}):
            want = one.attend([a], 1, q, "window", params)
            got = sharded.attend([b], 1, q, "window", params)
            torch.testing.assert_close(got.out, want.out, msg=str(params))
            torch.testing.assert_close(got.lse, want.lse, msg=str(params))
            assert got.bytes_read == want.bytes_read, params


def test_the_shard_rule_gives_each_shard_its_part_or_nothing():
    params = {"window": 5, "sinks": 3}
    assert shard_budget("window", params, [16], [41], False, 4, starts=[0]) == ("window", {"window": 0, "sinks": 3})
    assert shard_budget("window", params, [16], [41], False, 4, starts=[16]) is None
    assert shard_budget("window", params, [9], [41], True, 4, starts=[32]) == ("window", {"window": 5, "sinks": 0})
    assert shard_budget("window", params, [2], [41], True, 4, starts=[39]) == ("window", {"window": 2, "sinks": 0})


@pytest.mark.service
def test_over_grpc_it_answers_as_in_process():
    gen = torch.Generator().manual_seed(7)
    local = InProcessClient(store_config())
    with serving(*DEFAULT_STORE_FLAGS) as server, RemoteClient(server.target, timeout=20) as remote:
        ids = []
        k, v = torch.randn((2, 23, 2, 16), generator=gen), torch.randn((2, 23, 2, 16), generator=gen)
        for c in (local, remote):
            ids.append(c.create().seq_id)
            c.append(ids[-1], k, v)
        q = torch.randn((1, 4, 16), generator=gen)
        want = local.attend(ids[:1], 0, q, "window", {"window": 7})
        got = remote.attend(ids[1:], 0, q, "window", {"window": 7})
        torch.testing.assert_close(got.out, want.out)
        torch.testing.assert_close(got.lse, want.lse)
        assert got.bytes_read == want.bytes_read == window_bytes([23], 2, 16, 4, 4, 7)
        with pytest.raises(InvalidParameter):
            remote.attend(ids[1:], 0, q, "window", {"window": 7, "sinks": -1})
    assert STORE["num_kv_heads"] == 2


def test_generate_runs_the_window_method(tiny, tmp_path, capsys):  # noqa: F811 (the fixture)
    report, out, _ = run_generate(capsys, "--model", str(tiny[0]), "--prompt", "the theme of the thesis",
                                  "--max-new-tokens", "4", "--method", "window", "--window", "3", "--sinks", "1",
                                  "--json", str(tmp_path / "r.json"))
    assert report["method"] == "window" and report["params"] == {"window": 3, "sinks": 1}
    assert out == report["answer"] + "\n"


def test_eval_grid_window_rows_read_the_asked_share_of_dense_bytes():
    from kvcache.engine.eval_cli import method_grid

    S = 2048
    grid = dict(method_grid(S, P, "", "", itemsize=4, head_dim=D, at_bytes="window:8"))
    spec = grid["window bytes/8"]
    config = store_config()
    got = METHODS["window"].bytes_read(config, [S], METHODS["window"].parse(spec.params))
    assert abs(got / METHODS["dense"].bytes_read(config, [S], METHODS["dense"].parse({})) - 1 / 8) < 0.01


def test_eval_command_scores_the_window_rows(model, tmp_path, monkeypatch):  # noqa: F811 (the fixture)
    from kvcache.cli import main as kvcache_main

    use_model(monkeypatch, model)
    out = tmp_path / "eval.json"
    assert kvcache_main(["eval", "--contexts", "128", "--eval-tokens", "8", "--agree-tokens", "4",
                         "--passkey-lengths", "", "--sparq", "", "--quest", "", "--gate-bytes", "", "--gate-pages", "",
                         "--at-bytes", "window:4", "--page-size", "8", "--json", str(out), "--plot", ""]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["perplexity"]}
    window = rows["window bytes/4"]
    assert window["params"] == {"window": 128 // 4 - 4}
    assert abs(window["bytes_vs_dense"] - 1 / 4) < 0.05 and window["vs_dense"] != 0
