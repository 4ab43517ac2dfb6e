"""Byte budgets (kvcache.methods.byte_budget, .byte_allocation): a call asking for a share of dense attention's
bytes reads about that share, spread over layers uniformly or by a calibrated allocation, in process and over gRPC;
bad shares and bad allocation files are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.engine.byte_calibration import layer_curves
from kvcache.engine.config import ModelConfig
from kvcache.engine.model import random_model
from kvcache.errors import AllocationInvalid, InvalidParameter
from kvcache.methods.byte_allocation import (
    ByteAllocation,
    allocation_of,
    attach_allocation,
    load_allocation,
    save_allocation,
)

L, HKV, D, P = 4, 2, 16, 4
GRID = tuple(i / 8 for i in range(1, 9))
FLAT = tuple(min(1.0, f) for f in GRID)  # mass in proportion to positions: every position matters alike
PEAKED = tuple(min(1.0, 0.9 + f / 10) for f in GRID)  # nearly all mass on a few positions


def _allocation(rows=(FLAT, PEAKED, PEAKED, PEAKED)) -> ByteAllocation:
    return ByteAllocation(GRID, tuple(rows), HKV, D, model="test")


def _client(length: int = 256) -> tuple[InProcessClient, str]:
    client = InProcessClient(KVCacheConfig(L, HKV, D, page_size=P, dtype=torch.float32, device_pages=256))
    gen = torch.Generator().manual_seed(0)
    sid = client.create().seq_id
    client.append(sid, torch.randn((L, length, HKV, D), generator=gen), torch.randn((L, length, HKV, D), generator=gen))
    return client, sid


def test_shares_keep_the_mean_and_favour_layers_whose_attention_is_spread():
    a = _allocation()
    shares = a.shares(0.25)
    assert sum(shares) / L == pytest.approx(0.25, abs=1e-6)
    assert shares[0] > shares[1] == pytest.approx(shares[2]) == pytest.approx(shares[3])
    assert all(0.25 / 4 - 1e-9 <= s <= 1.0 for s in shares)
    assert min(a.shares(0.25, floor=0.2)) >= 0.2  # a method's least share holds in every layer
    assert a.shares(0.25, floor=0.3) == (0.25,) * L  # no room to move bytes: uniform


def test_a_call_reads_about_its_share_of_dense_bytes():
    client, sid = _client()
    q = torch.randn((1, 4, D))
    dense = client.attend([sid], 0, q).bytes_read
    for share in (0.125, 0.25, 0.5):
        got = client.attend([sid], 0, q, "sparq", {"bytes": share}).bytes_read / dense
        assert got == pytest.approx(share, rel=0.05)
    # a parameter given beside the budget wins over the derived one
    wide = client.attend([sid], 0, q, "sparq", {"bytes": 0.25, "local_window": 0})
    assert wide.bytes_read == client.attend([sid], 0, q, "sparq", {"bytes": 0.25}).bytes_read


@pytest.mark.parametrize("share", [0, -0.1, 1.5, True, "half", float("nan")])
def test_a_share_outside_zero_to_one_is_refused(share):
    client, sid = _client()
    with pytest.raises(InvalidParameter, match="bytes="):
        client.attend([sid], 0, torch.randn((1, 4, D)), "sparq", {"bytes": share})


def test_a_method_without_a_rule_for_the_share_says_so():
    client, sid = _client()
    with pytest.raises(InvalidParameter, match="no parameters read"):
        client.attend([sid], 0, torch.randn((1, 4, D)), "dense", {"bytes": 0.5})
    with pytest.raises(InvalidParameter, match="no parameters read"):  # below SparQ's r components of every key
        client.attend([sid], 0, torch.randn((1, 4, D)), "sparq", {"bytes": 0.01})


def test_a_planned_step_spends_the_budget_per_layer_by_the_allocation():
    client, sid = _client()
    attach_allocation(client.store, _allocation())
    q, k, v = torch.randn((1, 4, D)), torch.randn((1, HKV, D)), torch.randn((1, HKV, D))
    step = client.begin_step([sid], 4, "sparq", {"bytes": 0.25})
    got = [step.attend(layer, q, k, v).bytes_read for layer in range(L)]
    dense = [client.attend([sid], layer, q).bytes_read for layer in range(L)]
    assert got[0] > got[1]  # the layer whose attention is spread gets more
    assert sum(got) / sum(dense) == pytest.approx(0.25, rel=0.05)
    # Quest's pages gained nothing from the allocation where it was measured: its budget stays uniform.
    step = client.begin_step([sid], 4, "quest", {"bytes": 0.25})
    assert len({step.attend(layer, q, k, v).bytes_read for layer in range(L)}) == 1


def test_allocations_round_trip_and_bad_files_are_refused(tmp_path):
    a = _allocation()
    path = save_allocation(a, tmp_path / "a.json")
    assert load_allocation(path) == a
    with pytest.raises(AllocationInvalid, match="no readable"):
        load_allocation(tmp_path / "missing.json")
    doc = json.loads(path.read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "coverage": doc["coverage"][:2]}))
    with pytest.raises(AllocationInvalid, match="num_layers"):
        load_allocation(tmp_path / "bad.json")
    (tmp_path / "grid.json").write_text(json.dumps({**doc, "grid": [0.5, 0.25] + doc["grid"][2:]}))
    with pytest.raises(AllocationInvalid, match="grid"):
        load_allocation(tmp_path / "grid.json")
    client, _ = _client(8)
    with pytest.raises(AllocationInvalid, match="measured for"):
        attach_allocation(client.store, ByteAllocation(GRID, (FLAT,) * 3, HKV, D))
    assert allocation_of(client.store) is None


def test_calibration_curves_rise_to_all_of_the_mass():
    config = ModelConfig(96, 32, 48, 2, 4, 2, 8, max_position_embeddings=512)
    model = random_model(config, seed=2)
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 96, (40,), generator=gen).tolist() for _ in range(2)]
    curves = layer_curves(model, windows, queries=8, grid=GRID)
    assert len(curves) == 2
    for row in curves:
        assert all(b >= a - 1e-9 for a, b in zip(row, row[1:]))
        assert row[-1] == pytest.approx(1.0, abs=1e-6)
        assert row[0] >= GRID[0] - 1e-6  # the best positions hold at least their share of the mass


def test_a_remote_call_asks_for_bytes_as_an_in_process_one():
    from service_support import running_server

    from kvcache.clients.remote import RemoteClient

    with running_server() as server, RemoteClient(f"127.0.0.1:{server.port}") as client:
        sid = client.create().seq_id
        gen = torch.Generator().manual_seed(0)
        client.append(sid, torch.randn((2, 64, 2, 16), generator=gen), torch.randn((2, 64, 2, 16), generator=gen))
        q = torch.randn((1, 4, 16))
        ratio = client.attend([sid], 1, q, "sparq", {"bytes": 0.25}).bytes_read / client.attend([sid], 1, q).bytes_read
        assert ratio == pytest.approx(0.25, rel=0.1)
        with pytest.raises(InvalidParameter, match="bytes="):
            client.attend([sid], 1, q, "sparq", {"bytes": 2.0})
