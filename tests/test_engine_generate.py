"""Prefill, decode and generation through a KVCacheClient, on a random small model: in-process and over gRPC."""

from __future__ import annotations

import pytest
import torch
from service_support import STORE, serving, store_config
from test_engine_model import as_gguf, one_torch_thread  # noqa: F401 (an autouse fixture)

from kvcache import InProcessClient
from kvcache.engine import prefill as prefill_module
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import AttentionSpec, decode_step
from kvcache.engine.generate import generate
from kvcache.engine.model import random_model
from kvcache.engine.prefill import PrefillDtypes, model_in, prefill, prefill_dtypes
from kvcache.engine.reference import reference_logits
from kvcache.engine.sampling import Sampler
from kvcache.methods.sparq import sparq_bytes

# Shaped like the store every service test's server holds (2 layers, 2 kv heads, d=16, page 4, float32).
CONFIG = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=STORE["num_layers"],
                     num_heads=4, num_kv_heads=STORE["num_kv_heads"], head_dim=STORE["head_dim"], rope_theta=1000.0,
                     max_position_embeddings=256)
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32, 79, 50, 28], [84, 19, 71, 69, 39, 93, 75, 10,
           58, 20, 97, 49, 44, 59, 23, 7, 81, 64]]


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=11)


def client(**overrides) -> InProcessClient:
    return InProcessClient(store_config(**overrides))


def test_decode_through_the_store_matches_the_reference_at_every_step(model):
    raw = as_gguf(model.state_dict(), CONFIG)
    c = client()
    ids = list(PROMPTS[0])
    seq = c.create(token_ids=ids).seq_id
    logits = prefill(model, c, seq, ids, chunk_size=3)
    torch.testing.assert_close(logits.double(), reference_logits(raw, CONFIG, ids)[-1], rtol=1e-4, atol=1e-4)
    for _ in range(8):
        ids.append(int(logits.argmax()))
        step = decode_step(model, c, [seq], [ids[-1]], [len(ids) - 1])
        logits = step.logits[0]
        assert c.describe(seq).length == len(ids)
        torch.testing.assert_close(logits.double(), reference_logits(raw, CONFIG, ids)[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
def test_prefill_gives_the_same_logits_and_cache_for_any_chunk_size(model, chunk_size):
    def run(chunk: int):
        c = client()
        seq = c.create().seq_id
        logits = prefill(model, c, seq, PROMPTS[2], chunk_size=chunk)
        rows = torch.arange(len(PROMPTS[2])).expand(CONFIG.num_kv_heads, -1)
        return logits, c.fetch(seq, 1, "rows", rows).tensors

    logits, (k, v) = run(chunk_size)
    one_pass_logits, (k1, v1) = run(len(PROMPTS[2]))
    torch.testing.assert_close(logits, one_pass_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", [PrefillDtypes(torch.float32, torch.bfloat16),
                                    PrefillDtypes(torch.bfloat16, torch.bfloat16)], ids=["bf16-attention", "bf16"])
def test_a_prefill_in_bfloat16_stays_near_the_float32_one_and_takes_its_logits_from_the_float32_head(model, dtypes):
    def run(d):
        c = client()
        seq = c.create().seq_id
        logits = prefill(model, c, seq, PROMPTS[2], chunk_size=5, dtypes=d)
        rows = torch.arange(len(PROMPTS[2])).expand(CONFIG.num_kv_heads, -1)
        return logits, [c.fetch(seq, layer, "rows", rows).tensors for layer in range(CONFIG.num_layers)]

    exact, exact_kv = run(None)
    logits, kv = run(dtypes)
    assert logits.dtype == torch.float32 and not torch.equal(logits, exact)
    torch.testing.assert_close(logits, exact, rtol=0, atol=0.05 * exact.abs().max().item())
    if dtypes.weights == torch.float32:  # layer 0's K/V come from float32 projections of the embeddings alone
        assert all(torch.equal(a, b) for a, b in zip(kv[0], exact_kv[0]))
    for got, want in zip(kv[-1], exact_kv[-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
    if dtypes.weights != torch.float32:
        assert model_in(model, dtypes.weights) is model_in(model, dtypes.weights)  # one copy, kept
        assert model_in(model, dtypes.weights).dtype == dtypes.weights and model.dtype == torch.float32


def test_prefill_dtypes_take_bfloat16_attention_only_where_the_cpu_multiplies_it_in_hardware(model, monkeypatch):
    assert prefill_dtypes(model, "float16") == PrefillDtypes(torch.float16, torch.float16)
    monkeypatch.setattr(prefill_module, "cpu_has_fast_bfloat16", lambda: True)
    assert prefill_dtypes(model) == PrefillDtypes(torch.float32, torch.bfloat16)
    monkeypatch.setattr(prefill_module, "cpu_has_fast_bfloat16", lambda: False)
    assert prefill_dtypes(model) == PrefillDtypes(torch.float32, torch.float32)


class RecordingClient:
    """Passes every call to an InProcessClient and records the shapes of the appends."""

    def __init__(self, inner: InProcessClient) -> None:
        self.inner = inner
        self.appends: list[tuple[tuple[int, ...], int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def append(self, seq_id, k, v, layer=None, start=None, token_ids=None):
        self.appends.append((tuple(k.shape), len(token_ids)))
        return self.inner.append(seq_id, k, v, layer=layer, start=start, token_ids=token_ids)


def test_prefill_appends_each_chunk_once_for_all_layers_with_its_token_ids(model):
    c = RecordingClient(client())
    prefill(model, c, c.create().seq_id, PROMPTS[2], chunk_size=8)
    L, H, d = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim
    assert c.appends == [((L, 8, H, d), 8), ((L, 8, H, d), 8), ((L, 2, H, d), 2)]


def test_batch_decode_matches_decoding_each_prompt_alone(model):
    together = generate(model, client(), PROMPTS, max_new_tokens=10)
    alone = [generate(model, client(), [p], max_new_tokens=10).tokens[0] for p in PROMPTS]
    assert together.tokens == alone
    assert together.decode_steps == 9 and together.decode_tokens == 27


def test_dense_attention_bytes_per_token_follow_the_dense_formula(model):
    result = generate(model, client(), [PROMPTS[0]], max_new_tokens=6)
    L, H, d, itemsize = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, 4
    # Decode step i feeds the token at position len(prompt) + i, so it attends over one more position.
    lengths = [len(PROMPTS[0]) + i + 1 for i in range(5)]
    assert result.decode_tokens == 5
    assert result.attention_bytes == sum(L * 2 * S * H * d * itemsize for S in lengths)
    assert result.attention_bytes_per_token == result.attention_bytes / 5


def test_generation_stops_at_a_stop_token(model):
    free_run = generate(model, client(), [PROMPTS[1]], max_new_tokens=12).tokens[0]
    stop = free_run[4]
    first = free_run.index(stop)
    result = generate(model, client(), [PROMPTS[1]], max_new_tokens=12, stop_ids=[stop])
    assert result.tokens[0] == free_run[: first + 1]
    assert result.stop_reasons == ["stop"]
    assert generate(model, client(), [PROMPTS[1]], max_new_tokens=3).stop_reasons == ["length"]


def test_sequences_are_freed_when_generation_ends(model):
    c = client()
    generate(model, c, PROMPTS, max_new_tokens=4)
    assert c.store.sequence_ids() == []


def test_second_request_reuses_the_cached_prefix_and_gives_the_same_tokens(model):
    c = client()
    first = generate(model, c, [PROMPTS[2]], max_new_tokens=6)
    second = generate(model, c, [PROMPTS[2]], max_new_tokens=6)
    page = STORE["page_size"]
    assert first.reused_tokens == 0
    assert second.reused_tokens == (len(PROMPTS[2]) - 1) // page * page  # every full page but the last token's
    assert second.tokens == first.tokens


def test_sparq_runs_dense_while_the_context_is_shorter_than_k():
    spec = AttentionSpec("sparq", {"r": 8, "k": 32, "local_window": 4})
    assert spec.for_length(31) == ("dense", {})
    assert spec.for_length(32) == ("sparq", {"r": 8, "k": 32, "local_window": 4})
    assert AttentionSpec("quest", {"top_pages": 2}).for_length(1) == ("quest", {"top_pages": 2})


def test_a_byte_budget_runs_dense_until_the_method_can_read_so_little_then_reads_about_its_share(model):
    c = client()
    spec = AttentionSpec("sparq", {"bytes": 0.25})
    assert spec.for_length(2, c.config) == ("dense", {})  # k would be below one row
    assert spec.for_length(64, c.config) == ("sparq", {"bytes": 0.25})
    prompt = PROMPTS[2] * 4
    budget = generate(model, c, [prompt], max_new_tokens=4, spec=spec)
    dense = generate(model, client(), [prompt], max_new_tokens=4)
    assert budget.attention_bytes / dense.attention_bytes == pytest.approx(0.25, rel=0.1)


def test_sparq_with_k_beyond_the_context_decodes_exactly_as_dense(model):
    dense = generate(model, client(), PROMPTS, max_new_tokens=8)
    sparq = generate(model, client(), PROMPTS, max_new_tokens=8,
                     spec=AttentionSpec("sparq", {"r": 4, "k": 100, "local_window": 8}))
    assert sparq.tokens == dense.tokens
    assert sparq.attention_bytes == dense.attention_bytes


def test_sparq_reads_the_bytes_of_its_formula_once_the_context_exceeds_k(model):
    r, k = 4, 8
    prompt = PROMPTS[2]
    result = generate(model, client(), [prompt], max_new_tokens=6,
                      spec=AttentionSpec("sparq", {"r": r, "k": k, "local_window": 2}))
    lengths = [len(prompt) + i + 1 for i in range(5)]
    expected = sum(CONFIG.num_layers * sparq_bytes([S], CONFIG.num_kv_heads, CONFIG.head_dim, r, k, 4)
                   for S in lengths)
    assert result.attention_bytes == expected
    dense = generate(model, client(), [prompt], max_new_tokens=6)
    assert result.attention_bytes < dense.attention_bytes


def test_quest_over_every_page_decodes_as_dense(model):
    dense = generate(model, client(), PROMPTS, max_new_tokens=8)
    quest = generate(model, client(), PROMPTS, max_new_tokens=8, spec=AttentionSpec("quest", {"top_pages": 64}))
    assert quest.tokens == dense.tokens


def test_sampling_is_reproducible_by_seed_and_top_p_near_zero_is_greedy(model):
    def run(sampler: Sampler) -> list[int]:
        return generate(model, client(), [PROMPTS[0]], max_new_tokens=8, sampler=sampler).tokens[0]

    hot = Sampler(temperature=5.0, seed=1)
    assert run(hot) == run(hot)
    assert run(hot) != run(Sampler(temperature=5.0, seed=2))
    assert run(Sampler(temperature=1.0, top_p=1e-6, seed=3)) == run(Sampler())


def test_top_p_keeps_only_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(temperature=1.0, top_p=0.8)
    gen = sampler.generator()
    drawn = {int(sampler.sample(logits, gen)) for _ in range(300)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_sampler_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        Sampler(**bad)


def test_a_prompt_beyond_the_models_context_is_refused(model):
    with pytest.raises(ValueError, match="context"):
        generate(model, client(), [list(range(100)) * 3], max_new_tokens=1)


def test_generation_over_grpc_equals_in_process(model):
    from kvcache.clients.remote import RemoteClient

    sparq = AttentionSpec("sparq", {"r": 8, "k": 12, "local_window": 4})
    expected = {m: generate(model, client(), PROMPTS, max_new_tokens=8, spec=s, chunk_size=8)
                for m, s in (("dense", AttentionSpec()), ("sparq", sparq))}
    with serving() as server, RemoteClient(server.target) as remote:
        got = {m: generate(model, remote, PROMPTS, max_new_tokens=8, spec=s, chunk_size=8)
               for m, s in (("dense", AttentionSpec()), ("sparq", sparq))}
        rpcs = remote.stats()["rpcs"]
    for m, want in expected.items():
        assert got[m].tokens == want.tokens, m
        assert got[m].attention_bytes == want.attention_bytes, m
    # One Append per prefill chunk of 8 positions; decode appends ride on Attend. The second run finds the
    # prompts' full pages in the server's prefix cache and appends only what follows them.
    assert got["dense"].reused_tokens == 0
    assert got["sparq"].reused_tokens == sum((len(p) - 1) // 4 * 4 for p in PROMPTS)
    first_run = sum(-(-len(p) // 8) for p in PROMPTS)
    second_run = sum(-(-(len(p) - (len(p) - 1) // 4 * 4) // 8) for p in PROMPTS)
    assert rpcs["Append"]["calls"] == first_run + second_run


def test_generation_on_a_servers_shared_pool_equals_in_process(model):
    from kvcache.clients.remote import RemoteClient

    sparq = AttentionSpec("sparq", {"r": 8, "k": 12, "local_window": 4})
    with serving("--share-pool") as server, RemoteClient(server.target, data_plane="shared") as remote:
        for spec in (AttentionSpec(), sparq):
            want = generate(model, client(), PROMPTS, max_new_tokens=8, spec=spec, chunk_size=8)
            got = generate(model, remote, PROMPTS, max_new_tokens=8, spec=spec, chunk_size=8)
            assert got.tokens == want.tokens and got.attention_bytes == want.attention_bytes, spec.method
        stats = remote.stats()
    assert remote._local.pool is not None  # the decode steps ran here, on the mapped pool
    assert not {"AttendStream", "AttendLocal", "Attend"} & set(stats["rpcs"])  # no layer call reached the server
    assert stats["methods"]["sparq"]["calls"] > 0  # the engine's reads are booked at the server


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the model and the store on a GPU")
@pytest.mark.parametrize("method", ["dense", "sparq"])
def test_the_model_and_store_on_cuda_generate_what_the_cpu_does(model, method):
    """Prefill, a cached-prefix reuse, batched decode and seeded sampling with everything on the GPU (fp32)."""
    spec = AttentionSpec("sparq", {"r": 8, "k": 12, "local_window": 4}) if method == "sparq" else AttentionSpec()
    sampler = Sampler(temperature=0.8, top_p=0.9, seed=3)
    on_gpu = random_model(CONFIG, seed=11).to("cuda")
    cpu = generate(model, client(), PROMPTS, max_new_tokens=8, spec=spec, sampler=sampler)
    gpu_client = client(device="cuda")
    generate(on_gpu, gpu_client, [PROMPTS[2]], max_new_tokens=2, spec=spec)  # leaves PROMPTS[2]'s pages cached
    gpu = generate(on_gpu, gpu_client, PROMPTS, max_new_tokens=8, spec=spec, sampler=sampler)
    assert gpu.reused_tokens > 0
    assert gpu.tokens == cpu.tokens


def test_generate_names_a_device_it_cannot_use():
    from kvcache.engine.cli import model_device

    assert model_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name"):
        model_device("gpu0")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        model_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            model_device("cuda")


def test_generation_reports_the_steps_a_method_could_not_apply_to(model):
    client = InProcessClient(store_config())
    spec = AttentionSpec("sparq", {"r": 4, "k": 12})  # k above the prompt's 8 positions for the first steps
    result = generate(model, client, [list(range(1, 9))], max_new_tokens=8, spec=spec)
    assert result.steps_by_method == {"dense": 3, "sparq": 4}  # lengths 9..11 run dense, 12.. sparq
    assert sum(result.steps_by_method.values()) == result.decode_steps and result.graph_steps == 0


def test_continuous_batching_gives_each_prompt_what_it_gets_alone_and_keeps_the_batch_full(model):
    prompts = [list(range(1, n)) for n in (9, 4, 13, 6, 11)]
    alone = [generate(model, InProcessClient(store_config()), [p], max_new_tokens=6).tokens[0] for p in prompts]
    stop = alone[1][2]  # prompt 1 stops at its third token: the next prompt joins a batch part way through
    want = [t[: t.index(stop) + 1] if stop in t else t for t in alone]
    client = InProcessClient(store_config())
    batch_sizes = []
    begin = client.begin_step

    def spy(seq_ids, *args, **kw):
        batch_sizes.append(len(seq_ids))
        return begin(seq_ids, *args, **kw)

    client.begin_step = spy
    result = generate(model, client, prompts, max_new_tokens=6, max_batch=2, stop_ids=[stop])
    assert result.tokens == want
    assert max(batch_sizes) == 2 and len(batch_sizes) < sum(len(t) - 1 for t in want)  # steps were shared
    assert batch_sizes[: len(batch_sizes) - max(len(t) for t in want)].count(1) == 0  # full until the tail
    assert client.stats()["pool"]["sequences"] == 0  # every sequence freed as it finished
    assert result.decode_tokens == sum(len(t) - 1 for t in result.tokens)
