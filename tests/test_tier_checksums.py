"""Nothing corrupted is served: every K/V row read from the host or disk tier, by any method, fetch or dense
stream, is checked against the checksum written with it; a failed page is DATA_LOSS naming its sequence and page,
is quarantined, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from kvcache import InProcessClient, KVCacheConfig, RemoteClient
from kvcache.errors import PageCorrupted
from kvcache.service.server import Server, ServerOptions
from kvcache.store.tiers import DEVICE, DISK, HOST

L, HKV, D, P = 2, 2, 16, 4


def _config(tmp_path, **tiers) -> KVCacheConfig:
    return KVCacheConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=P, dtype=torch.float32, device="cpu",
                         device_pages=4, pinned_tail_pages=1, disk_path=str(tmp_path), **tiers)


def _fill(client, n, seed):
    gen = torch.Generator().manual_seed(seed)
    sid = client.create().seq_id
    client.append(sid, torch.randn((L, n, HKV, D), generator=gen), torch.randn((L, n, HKV, D), generator=gen))
    return sid


def _offloaded(client, sid, tier):
    store = client.store
    pages = store.page_table([sid], 0).indices.tolist()
    return [i for i, p in enumerate(pages) if int(store.tiers.tier[p]) == tier], pages


def _flip_a_byte(client, page, layer=0, kv=0, head=1, row=2):
    tiers = client.store.tiers
    storage = tiers.storage[int(tiers.tier[page])]
    storage.data[layer, int(tiers.slot[page]), kv, head, row].view(torch.uint8)[5] ^= 0x40


@pytest.mark.parametrize("tier", [HOST, DISK])
def test_a_flipped_byte_is_caught_by_every_read_path_and_only_its_page_is_refused(tmp_path, tier):
    client = InProcessClient(_config(tmp_path, host_pages=6 if tier == HOST else 0, disk_pages=20))
    a, b = _fill(client, 40, 1), _fill(client, 23, 2)
    indexes, pages = _offloaded(client, a, tier)
    assert len(indexes) >= 2, "the test needs pages of `a` on that tier"
    bad_index = indexes[0]
    _flip_a_byte(client, pages[bad_index])
    before_b = client.fetch(b, 0, "rows", torch.arange(23).expand(HKV, 23)).tensors
    q = torch.randn((1, HKV * 2, D))

    # fetch: the corrupted row, and the whole page through dense attention and both sparse methods that read it
    with pytest.raises(PageCorrupted, match=f"page {pages[bad_index]} of sequence {a}"):
        client.fetch(a, 0, "rows", torch.full((HKV, 1), bad_index * P + 2))
    with pytest.raises(PageCorrupted):
        client.attend([a], 0, q, "dense")
    with pytest.raises(PageCorrupted):
        client.attend([a], 0, q, "quest", {"top_pages": 10})
    with pytest.raises(PageCorrupted):
        client.attend([a], 0, q, "sparq", {"r": 4, "k": 40})
    # rows of the same sequence on sound pages are served: checks are per row, not per sequence
    good = indexes[1] * P
    client.fetch(a, 0, "rows", torch.arange(good, good + P).expand(HKV, P))
    # and the other layer of the same page, which no byte of the flip touched
    client.fetch(a, 1, "rows", torch.full((HKV, 1), bad_index * P + 2))
    # nothing else changed: the other sequence reads as before, the page counts add one quarantined page
    after_b = client.fetch(b, 0, "rows", torch.arange(23).expand(HKV, 23)).tensors
    assert all(torch.equal(x, y) for x, y in zip(before_b, after_b))
    client.attend([b], 0, q, "dense")
    assert client.stats()["pool"]["pages_quarantined"] == 1
    assert client.describe(a).lengths == (40, 40)


def test_rows_on_the_device_are_not_checked_and_a_sound_store_reads_every_path(tmp_path):
    client = InProcessClient(_config(tmp_path, host_pages=6, disk_pages=20))
    a = _fill(client, 60, 3)
    assert {int(client.store.tiers.tier[p]) for p in _offloaded(client, a, DEVICE)[1]} == {DEVICE, HOST, DISK}
    q = torch.randn((1, HKV * 2, D))
    for method, params in (("dense", {}), ("quest", {"top_pages": 10}), ("sparq", {"r": 4, "k": 40}),
                           ("window", {"window": 30})):
        client.attend([a], 0, q, method, params)
    assert client.stats()["pool"]["pages_quarantined"] == 0


@pytest.mark.service
def test_over_grpc_a_corrupted_page_is_data_loss(tmp_path):
    server = Server(_config(tmp_path, disk_pages=20), ServerOptions(port=0, workers=4, grace_seconds=1))
    server.start()
    try:
        with RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0) as client:
            local = server.servicer.client
            a = _fill(client, 40, 4)
            indexes, pages = _offloaded(local, a, DISK)
            _flip_a_byte(local, pages[indexes[0]])
            with pytest.raises(PageCorrupted, match=f"sequence {a}"):
                client.fetch(a, 0, "rows", torch.full((HKV, 1), indexes[0] * P + 2))
            with pytest.raises(PageCorrupted):
                client.attend([a], 0, torch.randn((1, HKV * 2, D)), "dense")
    finally:
        server.drain_and_stop()


@pytest.mark.service
def test_a_scrub_finds_and_quarantines_a_corrupted_page_in_process_over_grpc_and_from_the_command_line(tmp_path):
    from kvcache.cli import main as kvcache_main

    server = Server(_config(tmp_path, host_pages=6, disk_pages=20), ServerOptions(port=0, workers=4, grace_seconds=1))
    server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        with RemoteClient(target, timeout=10, retries=0) as client:
            local = server.servicer.client
            a, b = _fill(client, 40, 5), _fill(client, 20, 6)
            clean = client.verify()
            assert clean["corrupted_pages"] == [] and clean["pages_checked"] > 0
            assert kvcache_main(["verify", "--server", target]) == 0
            indexes, pages = _offloaded(local, a, DISK)
            _flip_a_byte(local, pages[indexes[-1]], layer=1, kv=1)
            report = client.verify()
            assert report == {"pages_checked": clean["pages_checked"], "corrupted_pages": [pages[indexes[-1]]],
                              "sequences": [a]}
            assert kvcache_main(["verify", "--server", target]) == 1
            assert local.stats()["pool"]["pages_quarantined"] == 1
            client.attend([b], 0, torch.randn((1, HKV * 2, D)), "dense")  # the rest is served as before
    finally:
        server.drain_and_stop()
