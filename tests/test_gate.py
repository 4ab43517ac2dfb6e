"""The learned page gate (docs/sparse-attention.md §3): page scores against a plain transcription of §3, the
choice of pages, save/load of its weights, and the decode method `gate` through the client."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.errors import GateFileInvalid, GateMissing, InvalidParameter
from kvcache.methods.gate import gate_bytes
from kvcache.methods.gate_model import GateShape, PageGate, gate_page_scores, gate_select
from kvcache.methods.gate_store import attach_gate, load_gate, save_gate

L, D, P = 2, 16, 4


def _transcribed_scores(q_w, q_b, k_w, q, keys, page_size, base):
    """§3 written out with loops: pool each page's raw keys [max, min, avg], project both sides, RoPE at block
    positions (the query at its page), softmax(Qg Kg^T / sqrt(dg)). q [Hkv, G, d], keys [S, Hkv, d] -> [Hkv, n]."""
    S, Hkv, d = keys.shape
    n = -(-S // page_size)
    dg = q_w.shape[-1]

    def rope(x, pos):
        out = torch.empty_like(x)
        half = dg // 2
        for i in range(half):
            theta = pos * base ** (-2 * i / dg)
            c, s = math.cos(theta), math.sin(theta)
            out[i] = x[i] * c - x[i + half] * s
            out[i + half] = x[i + half] * c + x[i] * s
        return out

    scores = torch.empty((Hkv, n))
    for h in range(Hkv):
        qg = rope(q[h].reshape(-1).double() @ q_w[h].double() + q_b[h].double(), n - 1)
        logits = []
        for i in range(n):
            block = keys[i * page_size : (i + 1) * page_size, h].double()
            pooled = torch.cat((block.max(0).values, block.min(0).values, block.mean(0)))
            logits.append(float(qg @ rope(pooled @ k_w[h].double(), i)) / math.sqrt(dg))
        scores[h] = torch.softmax(torch.tensor(logits), 0).float()
    return scores


def _model_unrotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [T, H, d] rotated by the engine's own RoPE (kvcache.engine.model, float64 tables) at `positions` [T],
    rotated back."""
    from kvcache.engine.model import apply_rope, rope_tables

    cos, sin = rope_tables(positions[None], x.shape[-1], base, torch.float64)
    return apply_rope(x.double()[None], cos, -sin)[0].float()


@pytest.mark.parametrize("hkv,G,S", [(2, 3, 17), (1, 2, 64), (3, 1, 30)])
def test_a_pre_rope_gates_scores_match_the_transcription_on_keys_and_q_rotated_back(hkv, G, S):
    """§3 as SeerAttention's AttnGate takes it: the model's q and keys before RoPE. The store holds them rotated;
    a pre-RoPE gate rotates them back first, and scores as the transcription does on the unrotated vectors."""
    base = 300.0
    gate = PageGate(GateShape(L, hkv, G, D, P, gate_dim=32, rope_base=100.0, model_rope_base=base), seed=4)
    client, ids, q, keys = _client_with([S], hkv, G)
    csr = client.store.page_table(ids, 1)
    pages = csr.pages_of(0)
    got = gate_page_scores(gate.layer(1), q[0].view(hkv, G, D), client.store.layer_view(1).k_summary[pages], keys[0]
                           .transpose(0, 1))
    plain_q = _model_unrotate(q[0].view(1, hkv * G, D), torch.tensor([S - 1]), base)[0].view(hkv, G, D)
    plain_k = _model_unrotate(keys[0], torch.arange(S), base)
    want = _transcribed_scores(gate.q_weight[1].detach(), gate.q_bias[1].detach(), gate.k_weight[1].detach(),
                               plain_q, plain_k, P, 100.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The same weights on the stored (rotated) vectors score otherwise: the rotation back is not a no-op.
    rotated = _transcribed_scores(gate.q_weight[1].detach(), gate.q_bias[1].detach(), gate.k_weight[1].detach(),
                                  q[0].view(hkv, G, D), keys[0], P, 100.0)
    assert not torch.allclose(got, rotated, atol=1e-3)


def _gate(hkv, G, d=D, page_size=P, gate_dim=32, seed=1):
    gate = PageGate(GateShape(L, hkv, G, d, page_size, gate_dim=gate_dim, rope_base=100.0), seed=seed)
    with torch.no_grad():
        gate.q_bias.normal_(generator=torch.Generator().manual_seed(seed))
    return gate


def _client_with(lengths, hkv, G, page_size=P, gate=None, seed=0):
    """A client over a store holding one random sequence per length, a query, and each sequence's layer-1 keys."""
    client = InProcessClient(KVCacheConfig(L, hkv, D, page_size=page_size, dtype=torch.float32, device_pages=256))
    if gate is not None:
        attach_gate(client.store, gate)
    gen = torch.Generator().manual_seed(seed)
    ids, keys = [], []
    for S in lengths:
        sid = client.create().seq_id
        k, v = torch.randn((L, S, hkv, D), generator=gen), torch.randn((L, S, hkv, D), generator=gen)
        for start in range(0, S, 7):  # uneven chunks
            client.append(sid, k[:, start : start + 7], v[:, start : start + 7])
        ids.append(sid)
        keys.append(k[1])
    return client, ids, torch.randn((len(lengths), hkv * G, D), generator=gen), keys


@pytest.mark.parametrize("hkv,G,S", [(1, 1, 4), (2, 3, 17), (3, 3, 33), (2, 4, 5), (1, 2, 64)])
def test_page_scores_match_a_transcription_of_section_3(hkv, G, S):
    gate = _gate(hkv, G)
    client, ids, q, keys = _client_with([S], hkv, G)
    store = client.store
    pages = store.page_table(ids, 1).pages_of(0)
    got = gate_page_scores(gate.layer(1), q[0].view(hkv, G, D), store.layer_view(1).k_summary[pages])
    want = _transcribed_scores(gate.q_weight[1].detach(), gate.q_bias[1].detach(), gate.k_weight[1].detach(),
                               q[0].view(hkv, G, D), keys[0], P, 100.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_selection_always_takes_the_first_and_last_page_and_the_best_between():
    scores = torch.tensor([[0.05, 0.1, 0.4, 0.05, 0.3, 0.1], [0.3, 0.3, 0.0, 0.2, 0.1, 0.1]])
    chosen, count = gate_select(scores, page_size=4, budget=16)  # 4 pages: first, last, best two between
    assert count.tolist() == [4, 4]
    assert [sorted(r) for r in chosen.tolist()] == [[0, 2, 4, 5], [0, 1, 3, 5]]
    chosen, count = gate_select(scores, page_size=4, budget=1)  # below two pages: still first and last
    assert count.tolist() == [2, 2] and [sorted(r[:2]) for r in chosen.tolist()] == [[0, 5], [0, 5]]


def test_threshold_keeps_the_pages_between_above_it_and_a_budget_caps_them():
    scores = torch.tensor([[0.05, 0.1, 0.4, 0.05, 0.3, 0.1]])  # between: .1 .4 .05 .3 -> /0.85
    chosen, count = gate_select(scores, 4, threshold=0.2)
    assert count.tolist() == [4] and sorted(chosen[0, :4].tolist()) == [0, 2, 4, 5]
    chosen, count = gate_select(scores, 4, budget=12, threshold=0.1)  # 3 pages fit
    assert count.tolist() == [3] and sorted(chosen[0, :3].tolist()) == [0, 2, 5]


def test_gate_bytes_count_one_cached_gate_key_per_page_and_the_filled_rows_of_chosen_pages():
    # S=10, P=4: 3 pages, the last holds 2 rows; head 0 reads 2 pages (4 + 2 rows), head 1 all 3 (10 rows);
    # scoring reads each page's gate key, dg=32 values of 2 bytes (bf16 cache) or 4 (float32).
    got = gate_bytes([10], 4, [[2, 3]], d=8, itemsize=2, gate_dim=32, key_itemsize=2)
    assert got == 2 * (3 * 32 * 2) + 2 * (6 + 10) * 8 * 2
    assert gate_bytes([10], 4, [[2, 3]], 8, 2, 32, 4) - got == 2 * 3 * 32 * 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_budget_covering_every_page_equals_dense_exactly(backend):
    hkv, G = 2, 3
    client, ids, q, _ = _client_with([17, 33, 5], hkv, G, gate=_gate(hkv, G))
    dense = client.attend(ids, 1, q, "dense", backend=backend)
    r = client.attend(ids, 1, q, "gate", {"budget": 10_000}, backend=backend)
    torch.testing.assert_close(r.out, dense.out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.lse, dense.lse, rtol=1e-6, atol=1e-6)
    gate_keys = sum(-(-S // P) * 32 * 4 * hkv for S in (17, 33, 5))  # dg=32 float32 values per page
    assert r.bytes_read == dense.bytes_read + gate_keys


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_small_budget_reads_exactly_the_chosen_pages(backend):
    hkv, G, S = 2, 3, 41  # 11 pages, the last holding 1 row
    gate = _gate(hkv, G)
    client, ids, q, keys = _client_with([S], hkv, G, gate=gate)
    store = client.store
    pages = store.page_table(ids, 1).pages_of(0)
    scores = gate_page_scores(gate.layer(1), q[0].view(hkv, G, D), store.layer_view(1).k_summary[pages])
    chosen, count = gate_select(scores, P, budget=16)
    r = client.attend(ids, 1, q, "gate", {"budget": 16}, backend=backend)
    # Exact attention over the chosen pages' rows only, per kv head.
    k1, vals = _client_kv(client, ids[0], S)
    assert torch.equal(k1, keys[0])
    for h in range(hkv):
        rows = sorted(p * P + i for p in chosen[h, : count[h]].tolist() for i in range(P) if p * P + i < S)
        qh = q[0].view(hkv, G, D)[h].float()
        logits = qh @ k1[rows, h].T / math.sqrt(D)
        want = torch.softmax(logits, -1) @ vals[rows, h]
        torch.testing.assert_close(r.out[0].view(hkv, G, D)[h], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.lse[0].view(hkv, G)[h], torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    assert count.tolist() == [4, 4]
    assert r.bytes_read == gate_bytes([S], P, [count.tolist()], D, 4, 32, 4)
    assert r.bytes_read == hkv * (11 * 32 * 4 + 2 * (3 * P + 1) * D * 4)


def _client_kv(client, seq_id, S):
    """Layer-1 K and V [S, Hkv, d] read back from the store through the page table."""
    store = client.store
    csr = store.page_table([seq_id], 1)
    view = store.layer_view(1)
    pages = csr.pages_of(0)
    k = view.k_seq[pages].transpose(1, 2).flatten(0, 1)[:S]
    v = view.v_seq[pages].transpose(1, 2).flatten(0, 1)[:S]
    return k, v


def test_gate_without_a_trained_gate_fails_naming_the_training_command():
    client, ids, q, _ = _client_with([9], 2, 3)
    with pytest.raises(GateMissing, match="kvcache train-gate"):
        client.attend(ids, 1, q, "gate", {"budget": 8})
    assert GateMissing.grpc_code == "FAILED_PRECONDITION"
    client.attend(ids, 1, q, "quest", {"top_pages": 2})  # other methods unaffected


def test_gate_parameters_are_checked():
    client, ids, q, _ = _client_with([9], 2, 3, gate=_gate(2, 3))
    for bad in ({}, {"budget": 0}, {"budget": 2.5}, {"threshold": 1.5}, {"top_pages": 3}):
        with pytest.raises(InvalidParameter):
            client.attend(ids, 1, q, "gate", bad)


def test_save_load_round_trip(tmp_path):
    gate = _gate(2, 3)
    path = save_gate(gate, tmp_path / "g.safetensors", model="tiny")
    back = load_gate(path, {"num_layers": L, "num_kv_heads": 2, "group": 3, "head_dim": D, "page_size": P})
    assert back.shape == gate.shape
    for name in ("q_weight", "q_bias", "k_weight"):
        assert torch.equal(getattr(back, name), getattr(gate, name).detach())


def test_a_gate_for_another_model_shape_is_rejected(tmp_path):
    path = save_gate(_gate(2, 3), tmp_path / "g.safetensors")
    with pytest.raises(GateFileInvalid, match="num_layers=2 \\(need 30\\)"):
        load_gate(path, {"num_layers": 30})
    client = InProcessClient(KVCacheConfig(L, 3, D, page_size=P, dtype=torch.float32, device_pages=16))
    with pytest.raises(GateFileInvalid, match="num_kv_heads"):
        attach_gate(client.store, path)
    client = InProcessClient(KVCacheConfig(L, 2, D, page_size=8, dtype=torch.float32, device_pages=16))
    with pytest.raises(GateFileInvalid, match="page_size"):
        attach_gate(client.store, path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_or_truncated_gate_file_is_an_error(tmp_path, damage):
    path = save_gate(_gate(2, 3), tmp_path / "g.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-7] ^= 0x40  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(GateFileInvalid):
        load_gate(path)


def test_a_missing_gate_file_names_the_training_command(tmp_path):
    with pytest.raises(GateMissing, match="kvcache train-gate"):
        load_gate(tmp_path / "none.safetensors")


def test_gate_over_the_attend_rpc(tmp_path):
    """A server started with --gate answers method gate as the in-process client does (budget and threshold
    travel as parameters); one without a gate answers FAILED_PRECONDITION naming the training command; a
    gate file for another shape stops the server before it serves."""
    from service_support import start_servers, stop_servers

    from kvcache.clients.remote import RemoteClient

    gate = _gate(2, 3)
    path = save_gate(gate, tmp_path / "g.safetensors")
    servers = start_servers({"gate": (("--gate", str(path)), {}), "plain": ((), {})})
    try:
        local, ids, q, _ = _client_with([23, 9], 2, 3, gate=gate)
        k, v = _client_kv(local, ids[0], 23)
        for name in ("gate", "plain"):
            with RemoteClient(servers[name].target) as remote:
                rid = remote.create().seq_id
                remote.append(rid, *(torch.stack([t] * L) for t in (k, v)))  # layer 1 = layer 0 here
                if name == "plain":
                    with pytest.raises(GateMissing, match="kvcache train-gate"):
                        remote.attend([rid], 1, q[:1], "gate", {"budget": 8})
                    remote.attend([rid], 1, q[:1], "quest", {"top_pages": 2})  # the sequence is unaffected
                    continue
                for params in ({"budget": 8}, {"threshold": 0.2}, {"budget": 12, "threshold": 0.05}):
                    got = remote.attend([rid], 1, q[:1], "gate", params)
                    want = local.attend(ids[:1], 1, q[:1], "gate", params)
                    torch.testing.assert_close(got.out, want.out)
                    assert got.bytes_read == want.bytes_read
    finally:
        stop_servers(list(servers.values()))
    wrong = save_gate(PageGate(GateShape(3, 2, 3, D, P, gate_dim=8)), tmp_path / "wrong.safetensors")
    from service_support import store_config

    from kvcache.service.server import Server, ServerOptions

    with pytest.raises(GateFileInvalid, match="num_layers=3 \\(need 2\\)"):
        Server(store_config(), ServerOptions(port=0, gate=str(wrong)))


def test_a_budget_for_a_share_of_dense_bytes_reads_that_share():
    from kvcache.methods.gate import gate_budget_for_share

    hkv, G, S, P16 = 2, 3, 2048, 16
    client, ids, q, _ = _client_with([S], hkv, G, page_size=P16, gate=_gate(hkv, G, page_size=P16))
    dense = client.attend(ids, 1, q[:1], "dense").bytes_read
    for f in (4, 8):
        budget = gate_budget_for_share(S, P16, 1 / f, D, 4, gate_dim=32, key_itemsize=4)
        got = client.attend(ids, 1, q[:1], "gate", {"budget": budget}).bytes_read
        assert abs(got / dense - 1 / f) < 0.02, (f, got / dense)


@pytest.mark.parametrize("budget,threshold", [(None, 0.05), (None, 0.0), (5 * P, None), (7 * P + 1, 0.02),
                                              (2 * P, 0.1), (None, 1.0)])
def test_selecting_all_rows_at_once_matches_gate_select_row_by_row(budget, threshold):
    from kvcache.methods.gate_model import gate_select_rows

    gen = torch.Generator().manual_seed(5)
    pages = torch.tensor([1, 2, 3, 9, 17, 40, 40, 6])  # one page, two, then some pages between, odd counts
    logits = torch.randn((len(pages), 40), generator=gen) * 3
    logits[3, 9:] = float("nan")  # past a row's pages the scoring kernel leaves garbage
    chosen, count = gate_select_rows(logits, pages, P, budget, threshold)
    for r, n in enumerate(pages.tolist()):
        ref, ref_count = gate_select(torch.softmax(logits[r : r + 1, :n], dim=-1), P, budget, threshold)
        assert int(count[r]) == int(ref_count[0]), r
        assert chosen[r, : count[r]].tolist() == ref[0, : ref_count[0]].tolist(), r
        assert (chosen[r, count[r] :] == n - 1).all()


def test_the_eval_grid_gate_budget_reads_the_asked_share_of_dense_bytes():
    from kvcache.engine.eval_cli import method_grid

    hkv, G, S, P16 = 2, 3, 2048, 16
    client, ids, q, _ = _client_with([S], hkv, G, page_size=P16, gate=_gate(hkv, G, page_size=P16))
    dense = client.attend(ids, 1, q[:1], "dense").bytes_read
    grid = dict(method_grid(S, P16, "", "", gate_bytes="4,8", gate_pages="", itemsize=4,
                             head_dim=D, gate_dim=32))
    for f in (4, 8):
        spec = grid[f"gate bytes/{f}"]
        got = client.attend(ids, 1, q[:1], spec.method, spec.params).bytes_read
        assert abs(got / dense - 1 / f) < 0.02, (f, got / dense)


def test_the_eval_grid_gate_threshold_rows_are_relative_to_the_pages_between_or_absolute():
    from kvcache.engine.eval_cli import gate_threshold_at, method_grid
    from kvcache.methods.gate import gate_bytes
    from kvcache.methods.gate_model import gate_page_scores, gate_select

    hkv, G, S, P16 = 2, 3, 2048, 16
    middle = S // P16 - 2
    grid = dict(method_grid(S, P16, "", "", gate_threshold="2/n, 0.01", head_dim=D, gate_dim=32))
    assert grid["gate thr=2/n"].params == {"threshold": pytest.approx(2 / middle)}
    assert grid["gate thr=0.01"].params == {"threshold": 0.01}
    assert gate_threshold_at("3/n", S + 1, P16) == pytest.approx(3 / (middle + 1))  # a partial page counts
    for bad in ("200/n", "1.5", "-0.1", "x"):
        with pytest.raises(ValueError):
            gate_threshold_at(bad, S, P16)

    # Served: the rows counted are the pages gate_select keeps at that threshold, renormalised over the middle.
    gate = _gate(hkv, G, page_size=P16)
    client, ids, q, keys = _client_with([S], hkv, G, page_size=P16, gate=gate)
    spec = grid["gate thr=2/n"]
    got = client.attend(ids, 1, q[:1], spec.method, spec.params)
    summary = client.store.layer_view(1).k_summary[client.store.page_table(ids, 1).pages_of(0)]
    _, count = gate_select(gate_page_scores(gate.layer(1), q[0].view(hkv, G, D), summary), P16,
                           threshold=spec.params["threshold"])
    assert 2 < count.max() < S // P16  # data-dependent: neither only the first and last nor every page
    assert got.bytes_read == gate_bytes([S], P16, [count.tolist()], D, 4, 32, 4)


def test_the_eval_grid_quest_bytes_rows_read_the_asked_share_of_dense_bytes():
    from kvcache.engine.eval_cli import method_grid

    hkv, G, S, P16 = 2, 3, 2048, 16
    client, ids, q, _ = _client_with([S], hkv, G, page_size=P16)
    dense = client.attend(ids, 1, q[:1], "dense").bytes_read
    grid = dict(method_grid(S, P16, "", "", itemsize=4, head_dim=D, quest_bytes="4,8"))
    for f in (4, 8):
        spec = grid[f"quest bytes/{f}"]
        got = client.attend(ids, 1, q[:1], spec.method, spec.params).bytes_read
        assert abs(got / dense - 1 / f) < 0.02, (f, got / dense)


def test_the_eval_grid_oracle_share_rows_read_that_share_of_rows_at_any_page_size():
    from kvcache.engine.eval_cli import method_grid

    hkv, G, S = 2, 3, 1000  # not a whole number of pages
    for P in (4, 8, 16):
        client, ids, q, _ = _client_with([S], hkv, G, page_size=P)
        dense = client.attend(ids, 1, q[:1], "dense").bytes_read
        grid = dict(method_grid(S, P, "", "", oracle_share="0.0625, 0.25"))
        for share in (0.0625, 0.25):
            spec = grid[f"oracle share={share}"]
            assert spec.params == {"budget": int(S * share) // P * P}
            got = client.attend(ids, 1, q[:1], spec.method, spec.params).bytes_read
            # rounded down to whole pages, and the budget counts the partly filled last page whole
            assert abs(got / dense - share) <= 2 * P / S, (P, share, got / dense)
    assert dict(method_grid(S, 16, "", "", oracle_share="0.001"))["oracle share=0.001"].params == {"budget": 32}
    for bad in ("0", "1.5", "x"):
        with pytest.raises(ValueError):
            method_grid(S, 16, "", "", oracle_share=bad)


def test_the_eval_grid_dense_layers_rows_lower_the_gate_budget_so_the_model_reads_the_asked_share():
    from kvcache.engine.decode import parse_layers
    from kvcache.engine.eval_cli import method_grid

    assert parse_layers("4-7, 12,5", 30) == [4, 5, 6, 7, 12] and parse_layers("", None) == []
    for bad in ("30", "7-4", "-1", "x"):
        with pytest.raises(ValueError):
            parse_layers(bad, 30)
    hkv, G, S, P16, layers = 2, 3, 2048, 16, 30
    client, ids, q, _ = _client_with([S], hkv, G, page_size=P16, gate=_gate(hkv, G, page_size=P16))
    grid = dict(method_grid(S, P16, "", "", gate_bytes="8", gate_pages="", itemsize=4, head_dim=D, gate_dim=32,
                            gate_dense_layers="7", num_layers=layers))
    plain, lowered = grid["gate bytes/8"], grid["gate bytes/8 dense@7"]
    assert lowered.method == "gate" and lowered.layers == {7: ("dense", {})}
    assert lowered.params["budget"] < plain.params["budget"]
    # Every layer holds the same positions here: one dense layer and 29 gate layers read 30/8 layers' dense bytes.
    dense = client.attend(ids, 1, q[:1], "dense").bytes_read
    gate = client.attend(ids, 1, q[:1], "gate", lowered.params).bytes_read
    assert abs((dense + (layers - 1) * gate) / (layers * dense) - 1 / 8) < 0.01
    with pytest.raises(ValueError, match="read more than 1/8"):
        method_grid(S, P16, "", "", gate_bytes="8", gate_dense_layers="0-3", num_layers=layers)
