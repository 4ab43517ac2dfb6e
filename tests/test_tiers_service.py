"""A tiered store behind `kvcache serve`: the same answers as in-process, bytes moved per tier on the wire, prefetch."""

from __future__ import annotations

import pytest
import torch
from service_support import STORE, serving, store_config

from kvcache import InProcessClient, errors
from kvcache.clients.remote import RemoteClient

L, HKV, D, P = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"], STORE["page_size"]
TIER_FLAGS = ("--layers", str(L), "--kv-heads", str(HKV), "--head-dim", str(D), "--page-size", str(P),
              "--dtype", STORE["dtype"], "--pages", "6", "--host-pages", "8", "--disk-pages", "40")


@pytest.fixture(scope="module")
def tiered_server(tmp_path_factory):
    with serving("--disk-path", str(tmp_path_factory.mktemp("disk")), store_flags=TIER_FLAGS) as server:
        yield server


def test_tiered_server_answers_like_an_in_process_store_and_reports_moves(tiered_server):
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn((L, 150, HKV, D), generator=gen), torch.randn((L, 150, HKV, D), generator=gen)
    q = torch.randn((1, 2 * HKV, D), generator=gen)
    local = InProcessClient(store_config())
    mine = local.create().seq_id
    local.append(mine, k, v)
    with RemoteClient(tiered_server.target) as remote:
        seq = remote.create().seq_id
        remote.append(seq, k, v)
        pool = remote.stats()["pool"]
        assert pool["pages_device"] == 6 and pool["pages_host"] == 8 and pool["pages_disk"] == 38 - 6 - 8
        for method, params in (("dense", {}), ("sparq", {"r": 8, "k": 24, "local_window": 4}),
                               ("quest", {"top_pages": 5})):
            want = local.attend([mine], 1, q, method, params)
            got = remote.attend([seq], 1, q, method, params)
            torch.testing.assert_close(got.out, want.out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.lse, want.lse, atol=1e-5, rtol=1e-5)
            assert got.bytes_read == want.bytes_read
            assert got.bytes_moved["device<-host"] > 0 and got.bytes_moved["device<-disk"] > 0
        moved = remote.stats()["bytes_moved"]
        page_bytes = L * 2 * HKV * P * D * 4
        assert moved["host<-device"] % page_bytes == 0 and moved["host<-device"] >= 32 * page_bytes
        assert moved["disk<-host"] >= 24 * page_bytes
        remote.free(seq)


def test_prefetch_over_grpc_brings_pages_up_and_rejects_unknown_pages(tiered_server):
    gen = torch.Generator().manual_seed(6)
    k, v = torch.randn((L, 60, HKV, D), generator=gen), torch.randn((L, 60, HKV, D), generator=gen)
    with RemoteClient(tiered_server.target) as remote:
        seq = remote.create().seq_id
        remote.append(seq, k, v)
        before = remote.stats()["bytes_moved"].get("device<-host", 0) + \
            remote.stats()["bytes_moved"].get("device<-disk", 0)
        remote.prefetch(seq, [0, 1])
        after = remote.stats()["bytes_moved"]
        assert after.get("device<-host", 0) + after.get("device<-disk", 0) == before + 2 * L * 2 * HKV * P * D * 4
        rows = torch.arange(8).expand(HKV, 8)
        keys, values = remote.fetch(seq, 0, "rows", rows).tensors
        torch.testing.assert_close(keys, k[0, :8].transpose(0, 1))
        torch.testing.assert_close(values, v[0, :8].transpose(0, 1))
        with pytest.raises(errors.PositionOutOfRange, match="page index"):
            remote.prefetch(seq, [15])
        with pytest.raises(errors.SequenceNotFound):
            remote.prefetch("0" * 32)
        remote.free(seq)
