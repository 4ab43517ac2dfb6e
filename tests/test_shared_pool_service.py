"""The shared pool (kvcache serve --share-pool; service/pool_sessions.py, clients/pool_plane.py): an engine leases each
decode step's pages, appends and attends on the mapped pool in its own process, and commits; the server stays the
owner of every sequence. Steps give what in-process steps give, a leased sequence refuses other changes until its step
ends, and an engine that dies or stalls loses its step, never the server's consistency."""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
from service_support import STORE, running_server, serving, store_config

from kvcache import errors
from kvcache.clients.inprocess import InProcessClient
from kvcache.clients.pool_plane import PoolPlane
from kvcache.clients.remote import RemoteClient
from kvcache.store import KVStore
from kvcache.store.page_pool import PagePool
from kvcache.store.shared_segment import SharedSegment
from kvcache.wire import kvcache_pb2 as pb

L, HKV, D, P = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"], STORE["page_size"]
HQ = 2 * HKV


def _target(server) -> str:
    return f"127.0.0.1:{server.port}"


def _fill(client, lengths: list[int], seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for n in lengths:
        sid = client.create().seq_id
        client.append(sid, torch.randn((L, n, HKV, D), generator=gen), torch.randn((L, n, HKV, D), generator=gen))
        ids.append(sid)
    return ids


def _steps(client, ids: list[str], method: str, params: dict | None, steps: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        step = client.begin_step(ids, HQ, method, params)
        for layer in range(L):
            q, k, v = (torch.randn((len(ids), h, D), generator=gen) for h in (HQ, HKV, HKV))
            result = step.attend(layer, q, k, v)
            outs.append(torch.cat([result.out.flatten(), result.lse.flatten()]))
    return torch.stack(outs)


@pytest.mark.parametrize("method, params", [("dense", None), ("sparq", {"r": 4, "k": 3}), ("quest", {"top_pages": 2}),
                                            ("window", {"window": 5, "sinks": 2})])
def test_steps_on_the_mapped_pool_equal_in_process_steps_and_the_server_takes_them_in(method, params):
    lengths = [3, P, 2 * P + 1]  # a page boundary is crossed during the steps by every sequence
    with running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="shared") as remote:
        local = InProcessClient(store_config())
        ids_r, ids_l = _fill(remote, lengths), _fill(local, lengths)
        steps = P + 1
        assert torch.equal(_steps(remote, ids_r, method, params, steps), _steps(local, ids_l, method, params, steps))
        assert remote._local.pool is not None and not remote._local.pool.closed  # the steps ran on the pool
        stats = remote.stats()["methods"][method]
        assert stats["calls"] == steps * L and stats["bytes_read"] > 0  # the engine's reads are counted at the server
        # What the server holds now (lengths, pages, summaries, value sums) serves its own calls as in-process.
        assert [remote.describe(s).lengths for s in ids_r] == [local.describe(s).lengths for s in ids_l]
        q = torch.randn((len(ids_r), HQ, D), generator=torch.Generator().manual_seed(5))
        for m, p in [("sparq", {"r": 4, "k": 6}), ("quest", {"top_pages": 2})]:
            for layer in range(L):
                got = remote.attend(ids_r, layer, q, m, p)
                want = local.attend(ids_l, layer, q, m, p)
                assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_a_leased_sequence_refuses_other_changes_until_its_step_ends():
    with (running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="shared") as engine,
          RemoteClient(_target(server), data_plane="grpc") as other):
        [sid] = _fill(engine, [5])
        step = engine.begin_step([sid], HQ)
        q, k, v = (torch.randn((1, h, D)) for h in (HQ, HKV, HKV))
        step.attend(0, q, k, v)
        for change in (lambda: other.fork(sid), lambda: other.free(sid), lambda: other.begin_step([sid], HQ),
                       lambda: other.append(sid, k, v, layer=1)):
            with pytest.raises(errors.SequenceLeased, match="leased"):
                change()
        assert other.describe(sid).lengths == (5, 5)  # reads go on
        step.attend(1, q, k, v)  # the last layer: the step is committed before attend returns
        assert other.describe(sid).lengths == (6, 6)
        other.fork(sid)


def test_an_unfinished_step_is_aborted_and_leaves_the_sequence_as_before():
    with running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="shared") as engine:
        local = InProcessClient(store_config())
        [sid], [lid] = _fill(engine, [6]), _fill(local, [6])
        step = engine.begin_step([sid], HQ, "quest", {"top_pages": 1})
        step.attend(0, *(torch.full((1, h, D), 50.0) for h in (HQ, HKV, HKV)))  # folded into page 1's summary
        engine.end_step()  # the step never reached layer 1: aborted
        assert engine.describe(sid).lengths == (6, 6)
        q = torch.randn((1, HQ, D), generator=torch.Generator().manual_seed(3))
        got, want = engine.attend([sid], 0, q, "quest", {"top_pages": 1}), local.attend([lid], 0, q, "quest",
                                                                                         {"top_pages": 1})
        assert torch.equal(got.out, want.out)  # the summary holds the committed rows only again
        assert torch.equal(_steps(engine, [sid], "dense", None, 2), _steps(local, [lid], "dense", None, 2))


def test_a_lease_of_several_steps_takes_their_pages_at_once_and_gives_back_those_it_did_not_use():
    lengths = [3, P - 1]
    with running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="shared") as remote:
        local = InProcessClient(store_config())
        ids_r, ids_l = _fill(remote, lengths), _fill(local, lengths)
        free = remote.stats()["pool"]["pages_free"]
        plane = remote.pool_plane()
        plane.lease(ids_r, 2 * P)  # the pages of 2P new positions per sequence, at once
        assert plane.store.steps_left == 2 * P
        assert [plane.store.describe(s).num_pages for s in ids_r] == [-(-(n + 2 * P) // P) for n in lengths]
        assert remote.stats()["pool"]["pages_free"] == free - sum(-(-(n + 2 * P) // P) - -(-n // P) for n in lengths)
        # Whole steps, one after the other, as a replayed graph writes them: no round trip between them.
        got = _steps(plane.client, ids_r, "dense", None, 3)
        assert plane.store.steps_left == 2 * P - 3 and plane.store.steps_done == 3
        plane.flush()  # three steps committed; the pages of the rest go back
        assert torch.equal(got, _steps(local, ids_l, "dense", None, 3))
        assert [remote.describe(s).lengths for s in ids_r] == [(n + 3,) * L for n in lengths]
        assert [remote.describe(s).num_pages for s in ids_r] == [-(-(n + 3) // P) for n in lengths]
        assert remote.stats()["pool"]["pages_free"] == free - sum(-(-(n + 3) // P) - -(-n // P) for n in lengths)
        with pytest.raises(errors.PlanStale):
            plane.client.begin_step(ids_r, HQ)  # ended: a step needs a lease again
        # A lease asks for more steps than the free pages hold: it gets one.
        hog = remote.create().seq_id
        remote.append(hog, *(torch.zeros((L, (remote.stats()["pool"]["pages_free"] - 2) * P, HKV, D)),) * 2)
        plane.lease(ids_r, 2 * P)
        assert plane.store.steps_left == 1
        assert torch.equal(_steps(plane.client, ids_r, "dense", None, 1, seed=7), _steps(local, ids_l, "dense", None,
                                                                                         1, seed=7))
        plane.flush()
        assert [remote.describe(s).lengths for s in ids_r] == [(n + 4,) * L for n in lengths]


def test_an_engine_that_goes_away_or_stalls_loses_its_step_and_the_sequence_is_free_again():
    with (running_server(share_pool=True, step_lease_seconds=0.5) as server,
          RemoteClient(_target(server), data_plane="grpc") as other):
        [gone, stalled] = _fill(other, [4, 4])
        engine = RemoteClient(_target(server), data_plane="shared")
        engine.begin_step([gone], HQ).attend(0, *(torch.randn((1, h, D)) for h in (HQ, HKV, HKV)))
        engine.close()  # its socket closes: the server aborts the step at once
        deadline = time.monotonic() + 5
        while True:
            try:
                other.fork(gone)
                break
            except errors.SequenceLeased:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        with RemoteClient(_target(server), data_plane="shared") as slow:
            step = slow.begin_step([stalled], HQ)
            step.attend(0, *(torch.randn((1, h, D)) for h in (HQ, HKV, HKV)))
            time.sleep(0.7)  # past the lease: the server aborts the step, and another client may change it
            other.append(stalled, torch.randn((1, HKV, D)), torch.randn((1, HKV, D)), layer=0)
            other.append(stalled, torch.randn((1, HKV, D)), torch.randn((1, HKV, D)), layer=1)
            with pytest.raises(errors.PlanStale, match="ran out"):
                step.attend(1, *(torch.randn((1, h, D)) for h in (HQ, HKV, HKV)))
            assert other.describe(stalled).lengths == (5, 5)


def test_an_engine_that_dies_holding_a_lease_of_several_steps_gives_all_its_pages_back():
    with (running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="grpc") as other):
        [sid] = _fill(other, [P - 1])
        free = other.stats()["pool"]["pages_free"]
        engine = RemoteClient(_target(server), data_plane="shared")
        plane = engine.pool_plane()
        plane.lease([sid], 3 * P)
        _steps(plane.client, [sid], "dense", None, 2)  # written whole, but never committed
        assert other.stats()["pool"]["pages_free"] < free
        engine.close()  # the server aborts the lease at once: the steps and their pages are gone
        deadline = time.monotonic() + 5
        while other.stats()["pool"]["pages_free"] != free:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert other.describe(sid).lengths == (P - 1,) * L
        other.append(sid, *(torch.randn((L, 1, HKV, D)),) * 2)  # free for any change again


def test_a_server_that_dies_is_unavailable_to_the_engine_at_once():
    with serving("--share-pool") as server, RemoteClient(server.target, timeout=30, data_plane="shared") as engine:
        [sid] = _fill(engine, [4])
        _steps(engine, [sid], "dense", None, 1)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            engine.begin_step([sid], HQ)
        assert time.monotonic() - t0 < 5


def test_the_pool_goes_only_to_a_ticket_holder_and_only_where_the_server_shares_it():
    with running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="shared") as client:
        offer = client._call("OpenDataPlane", pb.DataPlaneRequest())
        config = client.config
        with pytest.raises(ConnectionRefusedError):
            PoolPlane(offer.socket_path, "not-a-ticket", 5, 1 << 20, config)
        plane = PoolPlane(offer.socket_path, offer.ticket, 5, 1 << 20, config)
        assert plane.store.pool.k_seq.shape == KVStore(store_config()).pool.k_seq.shape
        with pytest.raises(ConnectionRefusedError):  # a ticket is good once
            PoolPlane(offer.socket_path, offer.ticket, 5, 1 << 20, config)
        plane.close()
    with running_server() as server, RemoteClient(_target(server), data_plane="shared") as client:
        offer = client._call("OpenDataPlane", pb.DataPlaneRequest())
        with pytest.raises(errors.NotSupported, match="share-pool"):
            PoolPlane(offer.socket_path, offer.ticket, 5, 1 << 20, client.config)
        [sid] = _fill(client, [4])
        assert type(client.begin_step([sid], HQ)).__name__ == "PlannedCalls"  # layer calls over the socket instead


def test_gate_and_byte_budget_steps_send_their_layer_calls_and_a_bad_lease_is_refused():
    with running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="shared") as client:
        [sid] = _fill(client, [4])
        assert type(client.begin_step([sid], HQ, "sparq", {"bytes": 0.5})).__name__ == "PlannedCalls"
        assert type(client.begin_step([sid], HQ, "gate", {"top_pages": 1})).__name__ == "PlannedCalls"
        with pytest.raises(errors.SequenceNotFound):
            client.begin_step(["nope"], HQ)
        with pytest.raises(errors.InvalidParameter, match="twice"):
            client.begin_step([sid, sid], HQ)
        assert client.describe(sid).lengths == (4, 4)


def test_the_page_cap_of_a_client_holds_for_leased_steps():
    with (running_server(share_pool=True, max_pages_per_client=1) as server,
          RemoteClient(_target(server), data_plane="shared") as client):
        [sid] = _fill(client, [P - 1])
        _steps(client, [sid], "dense", None, 1)  # fills its page
        with pytest.raises(errors.QuotaExceeded):
            client.begin_step([sid], HQ)
        assert client.describe(sid).lengths == (P, P)


def test_a_segment_maps_the_same_memory_in_another_mapping():
    config = store_config()
    nbytes = PagePool.regions(config)[1]
    pool = PagePool(config, SharedSegment(nbytes))
    other = PagePool(config, SharedSegment(nbytes, os.dup(pool.segment.fd)))
    pool.k_dim[1, 3, 0, 2, 1] = 7.0
    assert other.k_dim[1, 3, 0, 2, 1] == 7.0 and other.k_dim.stride() == pool.k_dim.stride()
    with pytest.raises(ValueError, match="holds"):
        SharedSegment(nbytes + 1, os.dup(pool.segment.fd))
    with pytest.raises(ValueError, match="untiered"):
        PagePool(store_config(host_pages=8), SharedSegment(nbytes))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through Linux's /proc")
def test_engines_that_come_and_go_leave_no_descriptor_behind_and_a_step_whose_checks_fail_holds_nothing():
    with (running_server(share_pool=True) as server, RemoteClient(_target(server), data_plane="grpc") as other):
        [sid] = _fill(other, [5])
        counts = []
        for _ in range(4):  # engines connect, step, and close: the process's descriptors do not grow
            engine = RemoteClient(_target(server), data_plane="shared")
            _steps(engine, [sid], "dense", None, 1)
            with pytest.raises(errors.ShapeMismatch):
                engine.begin_step([sid], HQ + 1)  # leased, then refused by the step's own checks
            other.fork(sid)  # the lease was aborted at once: the sequence takes changes again
            engine.close()
            del engine
            # The server's connection thread closes its end when it next runs (later on a loaded machine), and a
            # mapping holds a descriptor of its own (Python's mmap) until it is collected: wait for both, a while.
            deadline = time.monotonic() + 10
            while True:
                gc.collect()
                n = _open_fds()
                if not counts or n <= counts[0] + 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            counts.append(n)
        assert counts[-1] <= counts[0] + 1, counts  # a leak of the two mappings would add 2 a connection
        assert other.describe(sid).lengths == (9, 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU store's pool is shared through CUDA IPC")
def test_a_cuda_server_s_pool_serves_an_engine_s_eager_and_graph_steps_as_its_own_store():
    from kvcache.config import KVCacheConfig
    from kvcache.engine.config import ModelConfig
    from kvcache.engine.decode import AttentionSpec, decode_step
    from kvcache.engine.graph_decode import GraphDecoder, LeasedGraphDecoder
    from kvcache.engine.model import random_model

    cfg = ModelConfig(512, 128, 256, 3, 4, 2, 32, max_position_embeddings=8192)
    flags = ("--layers", "3", "--kv-heads", "2", "--head-dim", "32", "--page-size", "16", "--pages", "512",
             "--dtype", "float32", "--device", "cuda")
    model = random_model(cfg, seed=1, device="cuda")
    local = InProcessClient(KVCacheConfig(3, 2, 32, page_size=16, dtype=torch.float32, device="cuda",
                                          device_pages=512))
    with serving("--share-pool", store_flags=flags) as server, RemoteClient(server.target, data_plane="shared") as rc:
        lengths = [1000, 37]
        gen = torch.Generator().manual_seed(0)
        kvs = [torch.randn((2, 3, n, 2, 32), generator=gen) for n in lengths]
        ids_r, ids_l = [], []
        for client, ids in ((rc, ids_r), (local, ids_l)):
            for kv in kvs:
                sid = client.create().seq_id
                client.append(sid, kv[0], kv[1])
                ids.append(sid)
        leased, own = LeasedGraphDecoder(model, rc), GraphDecoder(model, local)
        positions, tokens = list(lengths), [3, 5]
        for i in range(30):  # graph steps, then eager steps (a different path through the same pool), then graphs
            spec = AttentionSpec("sparq", {"r": 8, "k": 32}) if i % 2 else AttentionSpec("dense", {})
            if 10 <= i < 20:
                got = decode_step(model, rc, ids_r, tokens, positions, spec).logits
                want = decode_step(model, local, ids_l, tokens, positions, spec).logits
            else:
                got, _ = leased.step(ids_r, tokens, positions, spec.method, spec.params)
                want, _ = own.step(ids_l, tokens, positions, spec.method, spec.params)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tokens = want.argmax(-1).tolist()
            positions = [p + 1 for p in positions]
        leased.end_step()  # a captured step's commit otherwise travels with the next lease
        assert [rc.describe(s).lengths for s in ids_r] == [local.describe(s).lengths for s in ids_l]
        q = torch.randn((2, 4, 32), device="cuda")
        got, want = rc.attend(ids_r, 2, q, "quest", {"top_pages": 4}), local.attend(ids_l, 2, q, "quest",
                                                                                     {"top_pages": 4})
        torch.testing.assert_close(got.out.cuda(), want.out, rtol=1e-4, atol=1e-4)
