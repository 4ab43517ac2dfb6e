"""A persistent disk tier (`--disk-dir`): prefix-cache pages that reach it, or are copied there at shutdown, are
served again after a restart, verified against their checksums; a corrupted one is dropped and counted, never
served; a store of another shape starts afresh; two stores cannot share a directory; a server killed with SIGKILL
still finds the pages that had reached the disk."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from service_support import DEFAULT_STORE_FLAGS, start_server

from kvcache import InProcessClient, KVCacheConfig, RemoteClient
from kvcache.errors import InvalidParameter
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate
from kvcache.store.tiers import DISK

PROMPT = list(range(100, 141))  # 41 tokens: 10 full pages of 4, one token left to compute


def _config(directory, **overrides) -> KVCacheConfig:
    return KVCacheConfig(**{"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "page_size": 4, "dtype": "float32",
                            "device_pages": 6, "disk_pages": 32, "disk_path": str(directory),
                            "disk_persistent": True, **overrides})


def _prefilled(client, k, v) -> str:
    sid = client.create(PROMPT).seq_id
    client.append(sid, k, v, token_ids=PROMPT)
    return sid


def _kv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 41, 2, 16), generator=g), torch.randn((2, 41, 2, 16), generator=g)


def _reuse(client, k, v) -> tuple[int, str]:
    info = client.create(PROMPT)
    n = info.cached_tokens
    client.append(info.seq_id, k[:, n:], v[:, n:], token_ids=PROMPT[n:])
    return n, info.seq_id


@pytest.mark.parametrize("method,params", [("dense", {}), ("sparq", {"r": 8, "k": 12}), ("quest", {"top_pages": 3})])
def test_a_closed_store_s_prefix_is_served_again_with_the_same_answers(tmp_path, method, params):
    k, v = _kv()
    q = torch.randn((1, 4, 16))
    first = InProcessClient(_config(tmp_path))
    sid = _prefilled(first, k, v)
    want = [first.attend([sid], layer, q, method, params).out for layer in (0, 1)]
    first.free(sid)
    assert first.store.close() == 10  # 5 pages had gone down; 5 were copied at close
    second = InProcessClient(_config(tmp_path))
    assert second.stats()["pool"]["pages_restored"] == 10
    cached, sid = _reuse(second, k, v)
    assert cached == 40
    for layer in (0, 1):
        torch.testing.assert_close(second.attend([sid], layer, q, method, params).out, want[layer], atol=1e-5,
                                   rtol=1e-5)
    second.store.close()


def test_a_page_corrupted_on_disk_is_dropped_and_counted_and_the_prefix_stops_before_it(tmp_path):
    k, v = _kv()
    first = InProcessClient(_config(tmp_path))
    first.free(_prefilled(first, k, v))
    first.store.close()
    index = torch.from_file(str(tmp_path / "index.bin"), size=32 * 5, dtype=torch.int64).view(32, 5)
    slot = int(torch.nonzero((index[:, 0] == 1) & (index[:, 4] == 3)).flatten()[0])  # the prefix's 4th page
    slot_bytes = 2 * 2 * 4 * 16 * 4  # K and V of one slot in one layer: [2, Hkv, P, d] float32
    with open(tmp_path / "pages.bin", "r+b") as f:  # pages.bin is [L, N, 2, Hkv, P, d]: layer 0 comes first
        f.seek(slot * slot_bytes + 77)
        byte = f.read(1)
        f.seek(slot * slot_bytes + 77)
        f.write(bytes([byte[0] ^ 0x10]))
    second = InProcessClient(_config(tmp_path))
    pool = second.stats()["pool"]
    assert (pool["pages_restored"], pool["pages_dropped_at_start"]) == (9, 1)
    cached, sid = _reuse(second, k, v)
    assert cached == 12  # pages 0-2 only: the chain breaks at the dropped page
    got = second.fetch(sid, 0, "rows", torch.arange(41).expand(2, 41)).tensors[0]
    torch.testing.assert_close(got, k[0].transpose(0, 1))  # what is served is what was written
    second.store.close()


def test_a_store_of_another_shape_starts_afresh(tmp_path):
    k, v = _kv()
    first = InProcessClient(_config(tmp_path))
    first.free(_prefilled(first, k, v))
    first.store.close()
    other = InProcessClient(_config(tmp_path, head_dim=32))
    files = other.store.tiers.storage[DISK].files
    assert "this store needs" in files.fresh_reason and other.stats()["pool"]["pages_restored"] == 0
    other.store.close()


def test_files_written_for_another_model_are_started_afresh_and_never_served(tmp_path):
    k, v = _kv()
    first = InProcessClient(_config(tmp_path, disk_namespace="model-a"))
    first.free(_prefilled(first, k, v))
    first.store.close()
    other = InProcessClient(_config(tmp_path, disk_namespace="model-b"))
    assert "model-a" in other.store.tiers.storage[DISK].files.fresh_reason
    assert other.create(PROMPT).cached_tokens == 0
    other.store.close()


def test_two_stores_cannot_share_a_disk_directory(tmp_path):
    first = InProcessClient(_config(tmp_path))
    with pytest.raises(InvalidParameter, match="in use by another kvcache store"):
        InProcessClient(_config(tmp_path))
    first.store.close()
    InProcessClient(_config(tmp_path)).store.close()  # free again once the first is closed


def test_a_persistent_disk_tier_needs_a_directory():
    with pytest.raises(InvalidParameter, match="disk_path"):
        KVCacheConfig(2, 2, 16, disk_pages=8, disk_persistent=True)


def test_a_gate_attached_after_a_restart_scores_the_restored_pages_as_before(tmp_path):
    gate = PageGate(GateShape(2, 2, 2, 16, 4, gate_dim=8, rope_base=100.0), seed=3)
    k, v = _kv()
    first = InProcessClient(_config(tmp_path))
    attach_gate(first.store, gate)
    sid = _prefilled(first, k, v)
    q = torch.randn((1, 4, 16))
    want = first.attend([sid], 1, q, "gate", {"budget": 12}).out
    first.free(sid)
    first.store.close()
    second = InProcessClient(_config(tmp_path))
    attach_gate(second.store, gate)
    _, sid = _reuse(second, k, v)
    torch.testing.assert_close(second.attend([sid], 1, q, "gate", {"budget": 12}).out, want, atol=1e-5, rtol=1e-5)
    second.store.close()


@pytest.mark.service
def test_a_server_killed_with_sigkill_serves_the_pages_that_reached_its_disk(tmp_path):
    flags = (*DEFAULT_STORE_FLAGS[:-4], "--pages", "6", "--disk-pages", "32", "--disk-dir", str(tmp_path),
             "--dtype", "float32")
    k, v = _kv()
    server = start_server(*flags)
    try:
        with RemoteClient(server.target, timeout=10) as client:
            _prefilled(client, k, v)  # the sequence stays live: only pages pushed down reach the disk
            on_disk = client.stats()["pool"]["pages_disk"]
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
    finally:
        server.stop()
    assert on_disk >= 4
    server = start_server(*flags)
    try:
        deadline = time.monotonic() + 10
        while "prefix pages restored" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"{on_disk} prefix pages restored, 0 dropped" in server.output()
        with RemoteClient(server.target, timeout=10) as client:
            cached, sid = _reuse(client, k, v)
            assert cached == 4 * on_disk  # the oldest pages went down first: they are the prompt's first
            got = client.fetch(sid, 1, "rows", torch.arange(41).expand(2, 41)).tensors[1]
            torch.testing.assert_close(got, v[1].transpose(0, 1))
    finally:
        server.stop()
