"""ShardedClient: a sequence over several KV servers, attention fanned out and merged by lse (docs/sparse-attention.md
§4)."""

from __future__ import annotations

import time

import pytest
import torch
from service_support import (
    STORE,
    one_torch_thread,  # noqa: F401 (an autouse fixture: importing it applies it here)
    start_servers,
    stop_servers,
    store_config,
)

from kvcache import InProcessClient
from kvcache.clients.remote import RemoteClient
from kvcache.clients.sharded import ShardedClient, shard_budget
from kvcache.engine.config import ModelConfig
from kvcache.engine.generate import generate
from kvcache.engine.model import random_model
from kvcache.errors import InvalidParameter, PositionOutOfRange, SequenceNotFound, StoreFull, Unavailable
from kvcache.methods import merge_lse

L, HKV, D, HQ = STORE["num_layers"], STORE["num_kv_heads"], STORE["head_dim"], 4


@pytest.fixture(scope="module")
def servers():
    """Four servers of the service tests' small store, and a fifth that one test kills."""
    procs = start_servers({name: ((), {}) for name in ("s0", "s1", "s2", "s3", "victim")})
    yield procs
    stop_servers(list(procs.values()))


def local_shards(n: int, **overrides) -> list[InProcessClient]:
    return [InProcessClient(store_config(**overrides)) for _ in range(n)]


def kv(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn((L, n, HKV, D), generator=gen), torch.randn((L, n, HKV, D), generator=gen)


class SlowClient:
    """An InProcessClient whose calls first sleep `delay` seconds (only the named ones, if given)."""

    def __init__(self, inner: InProcessClient, delay: float, only: tuple[str, ...] = ()) -> None:
        self.inner, self.delay, self.only = inner, delay, only

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr) or (self.only and name not in self.only):
            return attr

        def slow(*args, **kwargs):
            time.sleep(self.delay)
            return attr(*args, **kwargs)

        return slow


class FailingClient:
    """An InProcessClient whose `method` raises `error`."""

    def __init__(self, inner: InProcessClient, method: str, error: Exception) -> None:
        self.inner, self.method, self.error = inner, method, error

    def __getattr__(self, name):
        if name == self.method:
            def fail(*args, **kwargs):
                raise self.error
            return fail
        return getattr(self.inner, name)


# ---- phase 2: exactness --------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [2, 3, 4])
def test_dense_over_n_servers_equals_single_server_dense(servers, num_shards):
    gen = torch.Generator().manual_seed(num_shards)
    targets = [servers[f"s{i}"].target for i in range(num_shards)]
    shard_lens = [[13, 6, 9][: num_shards - 1] + [11], [5, 17, 3][: num_shards - 1] + [7]]  # odd, uneven
    with ShardedClient(targets) as sharded, RemoteClient(targets[0]) as single:
        seqs, refs = [], []
        for lens in shard_lens:  # two sequences, decoded as one batch
            seq, ref = sharded.create().seq_id, single.create().seq_id
            for i, n in enumerate(lens):
                k, v = kv(gen, n)
                sharded.append(seq, k, v, shard=i)
                single.append(ref, k, v)
            assert sharded.shard_lengths(seq) == lens
            assert sharded.describe(seq).lengths == (sum(lens),) * L
            seqs.append(seq)
            refs.append(ref)
        worst = 0.0
        for _ in range(3):  # decode steps: the new token goes to the last shard
            for layer in range(L):
                q = torch.randn((2, HQ, D), generator=gen)
                new_k, new_v = torch.randn((2, HKV, D), generator=gen), torch.randn((2, HKV, D), generator=gen)
                got = sharded.attend(seqs, layer, q, new_k=new_k, new_v=new_v)
                want = single.attend(refs, layer, q, new_k=new_k, new_v=new_v)
                worst = max(worst, float((got.out - want.out).abs().max()), float((got.lse - want.lse).abs().max()))
                assert got.bytes_read == want.bytes_read
        assert worst <= 1e-5
        assert sharded.shard_lengths(seqs[0])[-1] == shard_lens[0][-1] + 3
        assert sharded.describe(seqs[0]).lengths == (sum(shard_lens[0]) + 3,) * L
        for seq, ref in zip(seqs, refs):
            sharded.free(seq)
            single.free(ref)


def test_generation_through_shards_equals_one_store():
    """The engine does not change: generate() over three shards gives the tokens of one store."""
    config = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=L, num_heads=HQ,
                         num_kv_heads=HKV, head_dim=D, rope_theta=1000.0, max_position_embeddings=256)
    model = random_model(config, seed=3)
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43], [84, 19, 71, 69, 39, 93, 75]]
    one = generate(model, InProcessClient(store_config()), prompts, max_new_tokens=8, chunk_size=4)
    with ShardedClient(local_shards(3), block_size=5) as sharded:
        many = generate(model, sharded, prompts, max_new_tokens=8, chunk_size=4)
    assert many.tokens == one.tokens


# ---- placement -----------------------------------------------------------------------------


def test_appends_fill_shards_to_block_size_and_new_tokens_go_to_the_last_shard():
    gen = torch.Generator().manual_seed(0)
    with ShardedClient(local_shards(3), block_size=5) as c:
        seq = c.create().seq_id
        c.append(seq, *kv(gen, 7))
        assert c.shard_lengths(seq) == [5, 2, 0]
        for layer in range(L):
            c.attend([seq], layer, torch.randn((1, HQ, D)), new_k=torch.randn((1, HKV, D)),
                     new_v=torch.randn((1, HKV, D)))
        assert c.shard_lengths(seq) == [5, 2, 1]
        c.append(seq, *kv(gen, 4), start=8)  # shard 1 is sealed now: the open shard is the last
        assert c.shard_lengths(seq) == [5, 2, 5]
        with pytest.raises(PositionOutOfRange, match="sealed"):
            c.append(seq, *kv(gen, 1), shard=1)
        with pytest.raises(PositionOutOfRange, match="next position is 12"):
            c.append(seq, *kv(gen, 1), start=3)
        assert c.describe(seq).lengths == (12,) * L


def test_an_append_that_fails_on_a_later_shard_leaves_a_valid_prefix_and_names_the_shard():
    gen = torch.Generator().manual_seed(1)
    shards = local_shards(2) + local_shards(1, device_pages=1)  # the last shard holds 4 positions
    with ShardedClient(shards, block_size=3) as c:
        seq = c.create().seq_id
        with pytest.raises(StoreFull, match=r"shard 2 \(shard2\)"):
            c.append(seq, *kv(gen, 12))
        assert c.describe(seq).lengths == (6,) * L
        assert c.shard_lengths(seq) == [3, 3, 0]


def test_token_ids_go_to_shard_0_only_and_its_prefix_cache_is_reused():
    gen = torch.Generator().manual_seed(2)
    ids = list(range(20))
    with ShardedClient(local_shards(2), block_size=12) as c:
        first = c.create(token_ids=ids).seq_id
        k, v = kv(gen, 20)
        c.append(first, k, v, token_ids=ids)
        assert c.shard_lengths(first) == [12, 8]
        second = c.create(token_ids=ids)
        assert second.cached_tokens == 12  # shard 0's three full pages; shard 1 never sees token ids
        rows = torch.arange(12).expand(HKV, 12)
        got_k, got_v = c.fetch(second.seq_id, 1, "rows", rows).tensors
        torch.testing.assert_close(got_k, k[1, :12].transpose(0, 1))
        torch.testing.assert_close(got_v, v[1, :12].transpose(0, 1))


def test_fetch_reads_the_union_in_position_order():
    gen = torch.Generator().manual_seed(3)
    single = InProcessClient(store_config())
    with ShardedClient(local_shards(3), block_size=7) as c:
        seq, ref = c.create().seq_id, single.create().seq_id
        k, v = kv(gen, 18)
        c.append(seq, k, v)
        single.append(ref, k, v)
        rows = torch.randint(0, 18, (HKV, 9), generator=gen)
        for got, want in zip(c.fetch(seq, 0, "rows", rows).tensors, single.fetch(ref, 0, "rows", rows).tensors):
            torch.testing.assert_close(got, want)
        dims = torch.tensor([[0, 5, 9], [1, 2, 15]])
        torch.testing.assert_close(c.fetch(seq, 1, "columns", dims).tensors[0],
                                   single.fetch(ref, 1, "columns", dims).tensors[0])
        torch.testing.assert_close(c.fetch(seq, 1, "value_mean").tensors[0],
                                   single.fetch(ref, 1, "value_mean").tensors[0])
        assert c.fetch(seq, 0, "summaries").tensors[0].shape[0] == 2 + 2 + 1  # pages of 7, 7 and 4 positions
        with pytest.raises(PositionOutOfRange):
            c.fetch(seq, 0, "rows", torch.full((HKV, 1), 18))


# ---- sparse methods ------------------------------------------------------------------------


def test_sparse_budgets_are_split_by_each_shards_share():
    assert shard_budget("sparq", {"r": 4, "k": 40, "local_window": 8}, [100], [400], False, 4) == \
        ("sparq", {"r": 4, "k": 10, "local_window": 0})
    assert shard_budget("sparq", {"r": 4, "k": 40, "local_window": 16}, [40], [400], True, 4) == \
        ("sparq", {"r": 4, "k": 16, "local_window": 16})
    assert shard_budget("sparq", {"r": 4, "k": 40}, [8], [16], False, 4) == ("dense", {})
    assert shard_budget("quest", {"top_pages": 8}, [64], [256], False, 4) == ("quest", {"top_pages": 2})
    assert shard_budget("quest", {"top_pages": 8}, [16], [32], True, 4) == ("dense", {})
    assert shard_budget("gate", {"budget": 64, "threshold": 0.9}, [100], [400], False, 4) == \
        ("gate", {"budget": 16, "threshold": 0.9})
    assert shard_budget("gate", {"budget": 64}, [20], [40], False, 4) == ("dense", {})
    assert shard_budget("dense", {}, [5], [9], True, 4) == ("dense", {})


def test_sparse_methods_over_shards_are_the_lse_merge_of_each_shards_budgeted_run():
    gen = torch.Generator().manual_seed(4)
    shards = local_shards(2)
    with ShardedClient(shards, block_size=64) as c:
        seq = c.create().seq_id
        c.append(seq, *kv(gen, 100))
        q = torch.randn((1, HQ, D), generator=gen)
        subs = c.sub_ids(seq)
        for method, params in (("sparq", {"r": 4, "k": 30, "local_window": 8}), ("quest", {"top_pages": 6})):
            got = c.attend([seq], 1, q, method, params)
            parts = [s.attend([sub], 1, q, *shard_budget(method, params, [n], [100], i == 1, STORE["page_size"]))
                     for i, (s, sub, n) in enumerate(zip(shards, subs, (64, 36)))]
            out, lse = merge_lse(torch.stack([p.out for p in parts]), torch.stack([p.lse for p in parts]))
            torch.testing.assert_close(got.out, out)
            torch.testing.assert_close(got.lse, lse)
            assert got.bytes_read == sum(p.bytes_read for p in parts)


def test_sparq_and_quest_over_shards_find_peaked_attention_in_about_their_budget():
    gen = torch.Generator().manual_seed(4)
    with ShardedClient(local_shards(2), block_size=64) as c:
        seq = c.create().seq_id
        k, v = kv(gen, 128)
        k[:, [21, 90]] *= 4  # one salient key in each shard, and each query head looks at both
        c.append(seq, k, v)
        group = HQ // HKV
        q = torch.stack([2 * (k[0, 21, h // group] + k[0, 90, h // group]) for h in range(HQ)])[None]
        dense = c.attend([seq], 0, q)
        sparq = c.attend([seq], 0, q, "sparq", {"r": 4, "k": 32, "local_window": 8})
        quest = c.attend([seq], 0, q, "quest", {"top_pages": 8})
        for approx in (sparq, quest):
            assert approx.bytes_read <= dense.bytes_read / 2
            assert float((approx.out - dense.out).norm() / dense.out.norm()) < 0.05
        exact = c.attend([seq], 0, q, "sparq", {"r": 4, "k": 128})  # k covers every shard: dense per shard
        torch.testing.assert_close(exact.out, dense.out)


# ---- concurrency ---------------------------------------------------------------------------


def test_the_fan_out_overlaps_slow_shards():
    delay = 0.25
    gen = torch.Generator().manual_seed(5)
    shards = [SlowClient(s, delay, only=("attend",)) for s in local_shards(4)]
    with ShardedClient(shards, block_size=4) as c:
        seq = c.create().seq_id
        c.append(seq, *kv(gen, 16))
        q = torch.randn((1, HQ, D), generator=gen)
        c.attend([seq], 0, q)  # warm the shard threads
        t0 = time.perf_counter()
        c.attend([seq], 0, q)
        took = time.perf_counter() - t0
    assert delay <= took < 2 * delay, f"one step over 4 shards of {delay} s each took {took:.3f} s"


# ---- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", [0, 2])
def test_create_on_all_shards_or_none(failing):
    inner = local_shards(3)
    shards: list = list(inner)
    shards[failing] = FailingClient(inner[failing], "create", StoreFull("no free pages"))
    with ShardedClient(shards) as c, pytest.raises(StoreFull, match=rf"shard {failing} \(shard{failing}\): no free"):
        c.create()
    assert all(s.store.sequence_ids() == [] for s in inner)


def test_fork_on_all_shards_or_none():
    gen = torch.Generator().manual_seed(6)
    inner = local_shards(3)
    with ShardedClient(inner, block_size=3) as c:
        seq = c.create().seq_id
        c.append(seq, *kv(gen, 8))
    shards: list = list(inner)
    shards[1] = FailingClient(inner[1], "fork", StoreFull("no free pages"))
    with ShardedClient(shards, block_size=3) as c, pytest.raises(StoreFull, match="shard 1"):
        c.fork(seq)
    assert [len(s.store.sequence_ids()) for s in inner] == [1, 1, 1]


def test_a_shard_past_its_deadline_fails_the_call_and_a_late_create_is_undone():
    inner = local_shards(2)
    shards = [inner[0], SlowClient(inner[1], 0.6, only=("create",))]
    with ShardedClient(shards, timeout=0.2) as c:
        with pytest.raises(Unavailable, match=r"shard 1 \(shard1\).*DEADLINE_EXCEEDED"):
            c.create()
        time.sleep(0.8)  # the late create completes, and is freed
    assert inner[0].store.sequence_ids() == [] and inner[1].store.sequence_ids() == []


def test_a_shard_that_lost_the_sequence_fails_with_not_found_naming_it():
    gen = torch.Generator().manual_seed(7)
    inner = local_shards(3)
    with ShardedClient(inner, block_size=3) as c:
        seq = c.create().seq_id
        c.append(seq, *kv(gen, 9))
        inner[1].free(c.sub_ids(seq)[1])  # as if shard 1 had restarted empty
        with pytest.raises(SequenceNotFound, match=r"shard 1 \(shard1\)"):
            c.attend([seq], 0, torch.randn((1, HQ, D)))


def test_an_id_of_another_endpoint_list_is_refused():
    shards = local_shards(3)
    with ShardedClient(shards[:2], names=["a:1", "b:2"]) as c:
        seq = c.create().seq_id
    with ShardedClient(shards[:2], names=["b:2", "a:1"]) as swapped, pytest.raises(InvalidParameter, match="other"):
        swapped.describe(seq)
    with ShardedClient(shards, names=["a:1", "b:2", "c:3"]) as more, pytest.raises(InvalidParameter, match="2 shards"):
        more.describe(seq)


def test_shards_of_different_shapes_are_refused():
    shards = [InProcessClient(store_config()), InProcessClient(store_config(head_dim=32))]
    with ShardedClient(shards) as c, pytest.raises(InvalidParameter, match="shard 1"):
        c.config  # noqa: B018


def test_a_killed_server_fails_the_step_naming_it_and_the_other_shards_stay_usable(servers):
    gen = torch.Generator().manual_seed(8)
    targets = [servers["s0"].target, servers["victim"].target, servers["s2"].target]
    with ShardedClient(targets, block_size=5, timeout=10) as c:
        seq = c.create().seq_id
        c.append(seq, *kv(gen, 13))
        q = torch.randn((1, HQ, D), generator=gen)
        c.attend([seq], 0, q)
        servers["victim"].kill()
        with pytest.raises(Unavailable, match=rf"shard 1 \({targets[1]}\)"):
            c.attend([seq], 0, q, new_k=torch.randn((1, HKV, D)), new_v=torch.randn((1, HKV, D)))
        subs = c.sub_ids(seq)
        for i, lengths in ((0, (5, 5)), (2, (4, 3))):  # shard 2 took layer 0's new token before the step failed
            with RemoteClient(targets[i]) as alone:
                assert alone.describe(subs[i]).lengths == lengths
                out = alone.attend([subs[i]], 1, q).out
                assert torch.isfinite(out).all()
        with pytest.raises(Unavailable, match="shard 1"):
            c.free(seq)  # the live shards are freed all the same
        for i in (0, 2):
            with RemoteClient(targets[i]) as alone, pytest.raises(SequenceNotFound):
                alone.describe(subs[i])
