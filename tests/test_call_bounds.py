"""Work one call may cause is bounded by the store, not by the request: a working-memory estimate refuses an attend
that would not fit (RESOURCE_EXHAUSTED, before any work), and per-client caps bound the sequences and pages one
connection may hold while other clients go on."""

from __future__ import annotations

import argparse

import pytest
import torch
from service_support import running_server, store_config

from kvcache import InProcessClient, RemoteClient
from kvcache.errors import CallTooLarge, QuotaExceeded
from kvcache.methods.registry import METHODS
from kvcache.service import serve_cli
from kvcache.service.server import default_call_memory

pytestmark = pytest.mark.service


running = running_server


def _remote(server, use_stream: bool = True) -> RemoteClient:
    return RemoteClient(f"127.0.0.1:{server.port}", timeout=10, retries=0, use_stream=use_stream)


def _filled(client, n: int = 40) -> str:
    sid = client.create().seq_id
    client.append(sid, torch.randn((2, n, 2, 16)), torch.randn((2, n, 2, 16)))
    return sid


PARAMS = {"sparq": {"r": 4, "k": 8}, "quest": {"top_pages": 2}, "gate": {"budget": 8}, "oracle": {"budget": 8},
          "window": {"window": 8}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_estimate_grows_with_query_heads_and_length(method):
    m, c = METHODS[method], store_config()
    p = m.parse(PARAMS.get(method, {}))
    small = m.work_bytes(c, [40], 4, p)
    assert 0 < small < m.work_bytes(c, [40], 400, p) and small < m.work_bytes(c, [4000], 4, p)


def test_quest_counts_its_page_bound_per_query_head():
    c = store_config()
    quest, dense = METHODS["quest"], METHODS["dense"]
    extra = quest.work_bytes(c, [400], 64, quest.parse({"top_pages": 4})) - dense.work_bytes(c, [400], 64,
                                                                                          dense.parse({}))
    assert extra == 3 * 64 * 100 * 16 * 4


def test_an_attend_over_the_call_memory_is_refused_in_process_and_nothing_changes():
    client = InProcessClient(store_config())
    sid = _filled(client)
    client.store.max_call_bytes = 1 << 20
    q = torch.randn((1, 2000, 16))
    with pytest.raises(CallTooLarge, match="MiB of working memory"):
        client.attend([sid], 0, q, "quest", {"top_pages": 2}, new_k=torch.randn((1, 2, 16)),
                      new_v=torch.randn((1, 2, 16)))
    assert client.describe(sid).lengths == (40, 40)  # the new row was not appended
    client.attend([sid], 0, torch.randn((1, 4, 16)), "quest", {"top_pages": 2})  # an ordinary call still runs


def test_the_server_refuses_the_oversized_attend_with_resource_exhausted():
    with running(max_query_heads=100_000, max_call_memory=32 << 20) as server, _remote(server) as client:
        sid = _filled(client)
        with pytest.raises(CallTooLarge, match="RESOURCE_EXHAUSTED"):
            client.attend([sid], 0, torch.randn((1, 60_000, 16)), "quest", {"top_pages": 2})
        out = client.attend([sid], 0, torch.randn((1, 4, 16)), "quest", {"top_pages": 2}).out
        assert out.shape == (1, 4, 16)


def test_the_default_call_memory_admits_a_call_over_the_whole_store():
    c = store_config()
    dense = METHODS["dense"]
    whole = c.total_pages * c.page_size
    assert dense.work_bytes(c, [whole], 16 * c.num_kv_heads, dense.parse({})) < default_call_memory(c)


def test_a_client_at_its_sequence_cap_is_refused_and_others_are_not():
    with running(max_sequences_per_client=3) as server, _remote(server) as greedy, _remote(server) as other:
        held = [greedy.create().seq_id for _ in range(3)]
        with pytest.raises(QuotaExceeded, match="already holds 3 sequences"):
            greedy.create()
        with pytest.raises(QuotaExceeded):
            greedy.fork(held[0])
        assert other.create().seq_id  # another connection has its own count
        greedy.free(held[0])
        greedy.create()  # a freed sequence no longer counts
        assert server.servicer.client.stats()["pool"]["sequences"] == 4


def test_a_sequence_freed_by_its_lease_no_longer_counts():
    with running(max_sequences_per_client=1) as server, _remote(server) as client:
        sid = client.create(lease_seconds=0.3).seq_id
        with pytest.raises(QuotaExceeded):
            client.create()
        import time

        deadline = time.monotonic() + 5
        while sid in server.servicer.client.store.sequence_ids() and time.monotonic() < deadline:
            time.sleep(0.1)
        client.create()


@pytest.mark.parametrize("use_stream", [True, False], ids=["streamed", "unary"])
def test_a_client_at_its_page_cap_cannot_append_past_it(use_stream):
    with running(max_pages_per_client=12) as server, _remote(server, use_stream) as client, _remote(server) as other:
        sid = _filled(client, 40)  # 10 pages of 4
        with pytest.raises(QuotaExceeded, match="hold 10 pages and need 3 more"):
            client.append(sid, torch.randn((2, 9, 2, 16)), torch.randn((2, 9, 2, 16)))
        assert client.describe(sid).lengths == (40, 40)
        client.append(sid, torch.randn((2, 8, 2, 16)), torch.randn((2, 8, 2, 16)))  # 12 pages: the cap
        row, q = torch.randn((1, 2, 16)), torch.randn((1, 4, 16))
        with pytest.raises(QuotaExceeded, match="need 1 more"):  # position 48 would open page 13
            client.attend([sid], 0, q, new_k=row, new_v=row)
        client.attend([sid], 0, q)  # attending without new rows goes on
        assert client.describe(sid).lengths == (48, 48)
        _filled(other, 40)  # another connection is not held to this one's pages


def test_at_the_page_cap_a_step_s_later_layers_still_write_into_the_page_its_first_layer_used():
    with running(max_pages_per_client=12) as server, _remote(server) as client:
        sid = _filled(client, 47)  # 12 pages of 4, the last with one row free
        row, q = torch.randn((1, 2, 16)), torch.randn((1, 4, 16))
        for layer in (0, 1):  # position 47 in every layer: no new page
            client.attend([sid], layer, q, new_k=row, new_v=row)
        assert client.describe(sid).lengths == (48, 48)
        with pytest.raises(QuotaExceeded):  # position 48 would open page 13, planned or not
            client.plan_step([sid])
        with pytest.raises(QuotaExceeded):
            client.attend([sid], 0, q, new_k=row, new_v=row)
        assert client.describe(sid).num_pages == 12


def test_serve_flags_set_the_bounds():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    _, options = serve_cli.resolve(parser.parse_args(
        ["--max-call-memory", "64MiB", "--max-sequences-per-client", "7", "--max-pages-per-client", "0"]))
    assert (options.max_call_memory, options.max_sequences_per_client, options.max_pages_per_client) == (
        64 << 20, 7, 0)
    with pytest.raises(Exception, match="expected a count"):
        serve_cli.resolve(parser.parse_args(["--max-sequences-per-client", "-1"]))
