"""The Llama decoder against the transcription-level reference, on random small configs; safetensors loading."""

from __future__ import annotations

import json

import pytest
import torch

from kvcache.engine.config import ModelConfig
from kvcache.engine.errors import ModelFileError, ModelFileMissing, ModelFileTruncated
from kvcache.engine.load import load_model
from kvcache.engine.model import random_model
from kvcache.engine.prefill import causal_attention
from kvcache.engine.reference import reference_logits
from kvcache.engine.safetensors_loader import load_safetensors

CONFIG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     head_dim=16, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=64)
PROMPT = [5, 17, 3, 96, 42, 42, 0, 11, 64, 7, 30]

# HF name -> GGUF name, as llama.cpp's converter maps a LlamaForCausalLM (written out here, not imported).
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for the engine tests (the other engine test files import this fixture): their ops are
    small, so a second thread costs more than it gives, and several times more when other processes share the
    cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, interleave the two halves of the rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_gguf(state: dict[str, torch.Tensor], c: ModelConfig, permute: bool = True) -> dict[str, torch.Tensor]:
    """A HF state dict under GGUF names, with q/k rows in llama.cpp's order (unless permute=False)."""
    out = {}
    for name, w in state.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{HF_TO_GGUF[rest]}"
        else:
            gname = HF_TO_GGUF[name]
        if permute and rest_is(name, "q_proj"):
            w = llama_cpp_permute(w, c.num_heads)
        elif permute and rest_is(name, "k_proj"):
            w = llama_cpp_permute(w, c.num_kv_heads)
        out[gname] = w
    return out


def rest_is(name: str, proj: str) -> bool:
    return name.endswith(f"self_attn.{proj}.weight")


def full_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return causal_attention(q[0], k[0], v[0])[None]


def model_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), torch.arange(len(ids))[None], full_attention)[0]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_the_reference_on_a_random_config(tied):
    c = ModelConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    model = random_model(c, seed=1)
    got = model_logits(model, PROMPT)
    ref = reference_logits(as_gguf(model.state_dict(), c), c, PROMPT)
    assert got.shape == (len(PROMPT), c.vocab_size)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_tied_model_has_no_lm_head_and_reads_logits_from_the_embeddings():
    c = ModelConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    model = random_model(c)
    assert "lm_head.weight" not in model.state_dict()
    assert model.output_weight is model.model.embed_tokens.weight


def test_reference_check_fails_without_llama_cpps_row_order():
    # The agreement above is not automatic: the same weights in the wrong q/k row order disagree.
    model = random_model(CONFIG, seed=2)
    ref = reference_logits(as_gguf(model.state_dict(), CONFIG, permute=False), CONFIG, PROMPT)
    assert (model_logits(model, PROMPT).double() - ref).abs().max() > 1e-2


def test_logits_of_a_prefix_do_not_depend_on_later_tokens():
    model = random_model(CONFIG, seed=3)
    full = model_logits(model, PROMPT)
    torch.testing.assert_close(model_logits(model, PROMPT[:4]), full[:4], rtol=1e-5, atol=1e-5)


def test_last_only_returns_the_last_positions_logits():
    model = random_model(CONFIG, seed=4)
    ids = torch.tensor([PROMPT])
    last = model(ids, torch.arange(len(PROMPT))[None], full_attention, last_only=True)
    assert last.shape == (1, 1, CONFIG.vocab_size)
    torch.testing.assert_close(last[0, 0], model_logits(model, PROMPT)[-1])


# ---- safetensors checkpoints -------------------------------------------------------------------


def hf_config(c: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
    }


def write_checkpoint(tmp_path, model, c: ModelConfig, shards: int = 1):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(hf_config(c)))
    names = list(model.state_dict())
    for i in range(shards):
        part = {n: model.state_dict()[n].contiguous() for n in names[i::shards]}
        save_file(part, str(tmp_path / f"model-{i:05d}-of-{shards:05d}.safetensors"))
    return tmp_path


@pytest.mark.parametrize("shards", [1, 2])
def test_safetensors_checkpoint_loads_the_same_model(tmp_path, shards):
    model = random_model(CONFIG, seed=5)
    loaded = load_safetensors(write_checkpoint(tmp_path, model, CONFIG, shards))
    assert loaded.config == CONFIG
    torch.testing.assert_close(model_logits(loaded, PROMPT), model_logits(model, PROMPT), rtol=0, atol=0)


def test_safetensors_checkpoint_in_bfloat16_loads_in_the_asked_dtype(tmp_path):
    model = random_model(CONFIG, seed=6, dtype=torch.bfloat16)
    loaded = load_safetensors(write_checkpoint(tmp_path, model, CONFIG), dtype=torch.float32)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.float())


def test_safetensors_missing_directory_or_config_is_refused(tmp_path):
    with pytest.raises(ModelFileMissing, match="does not exist"):
        load_safetensors(tmp_path / "nowhere")
    with pytest.raises(ModelFileMissing, match="config.json"):
        load_safetensors(tmp_path)


def test_safetensors_truncated_file_is_refused(tmp_path):
    write_checkpoint(tmp_path, random_model(CONFIG), CONFIG)
    (path,) = tmp_path.glob("*.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileTruncated, match="truncated"):
        load_safetensors(tmp_path)


def test_safetensors_checkpoint_with_a_missing_tensor_names_it(tmp_path):
    from safetensors.torch import save_file

    model = random_model(CONFIG)
    state = {n: t for n, t in model.state_dict().items() if n != "model.layers.1.mlp.up_proj.weight"}
    (tmp_path / "config.json").write_text(json.dumps(hf_config(CONFIG)))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_safetensors(tmp_path)


def write_byte_level_tokenizer(directory, vocab_size: int) -> None:
    """tokenizer.json (byte-level BPE over the first `vocab_size` - 2 ids, two specials) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"Ġt": 256, "he": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(directory / "tokenizer.json"))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}[assistant] "
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True, "chat_template": template}))


def test_checkpoint_directory_loads_with_its_tokenizer(tmp_path):
    config = ModelConfig(**{**CONFIG.__dict__, "vocab_size": 260})
    model = random_model(config, seed=7)
    write_checkpoint(tmp_path, model, config)
    write_byte_level_tokenizer(tmp_path, config.vocab_size)
    loaded, tok = load_model(tmp_path)
    assert loaded.config == config
    assert tok.eos_id == tok.token_id("</s>") and tok.bos_id == tok.token_id("<s>")
    ids = tok.encode("the heat, naïve")
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "the heat, naïve"
    assert tok.render_chat("hi") == "[user] hi</s>[assistant] "
    assert tok.encode_chat("hi")[0] == tok.bos_id and tok.encode_chat("hi").count(tok.bos_id) == 1


def test_checkpoint_directory_without_a_tokenizer_is_refused(tmp_path):
    write_checkpoint(tmp_path, random_model(CONFIG), CONFIG)
    with pytest.raises(ModelFileMissing, match="tokenizer.json"):
        load_model(tmp_path)
