"""The GGUF loader on small files written here (and on the shipped SmolLM2 file cut short), and `kvcache generate`."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from service_support import serving
from test_engine_model import as_gguf, one_torch_thread  # noqa: F401 (an autouse fixture)

from kvcache.cli import main as kvcache_main
from kvcache.engine.config import ModelConfig
from kvcache.engine.errors import ModelFileError, ModelFileMissing, ModelFileTruncated, UnsupportedModel
from kvcache.engine.gguf_loader import GGUFModelFile, load_gguf
from kvcache.engine.load import load_model, smollm2_path
from kvcache.engine.model import random_model
from kvcache.engine.prefill import causal_attention
from kvcache.engine.reference import reference_logits

# Shaped like the service tests' server store (2 layers, 2 kv heads, d=16), so `--server` works with it.
CONFIG = ModelConfig(vocab_size=0 + 256 + 3 + 3, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=1000.0, rms_norm_eps=1e-5, max_position_embeddings=128)
MERGES = ["Ġ t", "h e", "Ġt he"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


TOKENS = [*byte_symbols(), *("".join(m.split()) for m in MERGES), *SPECIALS]


def write_gguf(path, model, config: ModelConfig, arch: str = "llama", quantize: bool = True) -> None:
    """A GGUF file as llama.cpp's converter would write `model`: metadata, byte-level BPE vocabulary, tensors
    (matrices in Q8_0 when `quantize`, norms in F32), q/k rows in llama.cpp's order."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(TOKENS.index("<|im_end|>"))
    for name, t in as_gguf(model.state_dict(), config).items():
        a = t.float().numpy()
        if quantize and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of a small untied Llama GGUF, the model it was written from)."""
    model = random_model(CONFIG, seed=21)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, model, CONFIG)
    return path, model


def logits_of(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), torch.arange(len(ids))[None],
                 lambda layer, q, k, v: causal_attention(q[0], k[0], v[0])[None])[0]


def test_loaded_model_matches_the_reference_on_the_files_tensors(tiny):
    path, _ = tiny
    model, _ = load_gguf(path)
    ids = [5, 200, 17, 256, 3, 3, 99, 140]
    ref = reference_logits(GGUFModelFile(path).raw_tensors(), model.config, ids)
    torch.testing.assert_close(logits_of(model, ids).double(), ref, rtol=1e-4, atol=1e-4)


def test_hyperparameters_come_from_the_metadata(tiny):
    path, _ = tiny
    assert GGUFModelFile(path).config() == CONFIG


def test_embeddings_are_tied_when_the_file_has_no_output_matrix(tmp_path):
    config = ModelConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    write_gguf(tmp_path / "tied.gguf", random_model(config), config)
    model, _ = load_gguf(tmp_path / "tied.gguf")
    assert model.config.tie_word_embeddings and model.lm_head is None


def test_quantized_matrices_are_dequantized_close_to_the_originals(tiny):
    path, original = tiny
    loaded, _ = load_gguf(path)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        want, got = original.state_dict()[name], loaded.state_dict()[name]
        assert (got - want).abs().max() <= 0.01 * want.abs().max(), name  # Q8_0: 8 bits per 32-value block
        assert not torch.equal(got, want)  # they did go through 8 bits


def test_unquantized_file_loads_exactly(tmp_path):
    model = random_model(CONFIG, seed=22)
    write_gguf(tmp_path / "f32.gguf", model, CONFIG, quantize=False)
    loaded, _ = load_gguf(tmp_path / "f32.gguf")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_tokenizer_comes_from_the_files_vocabulary(tiny):
    _, tok = load_gguf(tiny[0])
    ids = tok.encode("the theme")
    assert [tok.backend.id_to_token(i) for i in ids] == ["t", "he", "Ġthe", "m", "e"]
    assert tok.decode(ids) == "the theme"
    assert tok.eos_id == TOKENS.index("<|im_end|>")


def test_missing_file_is_refused_with_its_path(tmp_path):
    with pytest.raises(ModelFileMissing, match=r"nowhere\.gguf does not exist") as err:
        load_model(tmp_path / "nowhere.gguf")
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("keep", [2, 200, 0.5, -10], ids=["magic", "metadata", "half", "last-bytes"])
def test_truncated_file_is_refused(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    (tmp_path / "cut.gguf").write_bytes(data[:n])
    with pytest.raises(ModelFileTruncated, match="truncated"):
        load_gguf(tmp_path / "cut.gguf")


def test_truncated_smollm2_file_is_refused(tmp_path):
    data = smollm2_path().read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(ModelFileTruncated, match=r"cut\.gguf .*truncated"):
        load_model(tmp_path / "cut.gguf")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_gguf(tmp_path / "x.gguf")


def test_another_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="'mamba'"):
        load_gguf(tmp_path / "other.gguf")


# ---- kvcache generate ------------------------------------------------------------------------------


def run_generate(capsys, *flags: str) -> tuple[dict, str, str]:
    """`kvcache generate` in this process: (its JSON report, stdout, stderr)."""
    out_json = flags[flags.index("--json") + 1]
    assert kvcache_main(["generate", *flags]) == 0
    captured = capsys.readouterr()
    with open(out_json) as f:
        return json.load(f), captured.out, captured.err


def test_generate_command_streams_the_answer_and_reports_speed_and_bytes(tiny, tmp_path, capsys):
    prompt = "the theme of the thesis"
    n = len(load_gguf(tiny[0])[1].encode(prompt))
    report, out, err = run_generate(capsys, "--model", str(tiny[0]), "--prompt", prompt, "--max-new-tokens", "6",
                                    "--chunk-size", "4", "--json", str(tmp_path / "r.json"))
    assert out == report["answer"] + "\n"
    assert report["method"] == "dense" and report["params"] == {}
    assert report["prompt_tokens"] == n > 4 and 1 <= report["new_tokens"] <= 6
    assert report["tokens_per_second"] > 0 and report["attention_bytes_per_token"] > 0
    assert "prefill [" in err and f"{n}/{n} tokens" in err  # the progress bar of a multi-chunk prefill
    assert "tokens/s" in err and "bytes/token" in err


def test_generate_command_passes_the_sparq_parameters(tiny, tmp_path, capsys):
    prompt = "the theme of the thesis"
    n = len(load_gguf(tiny[0])[1].encode(prompt))
    report, _, _ = run_generate(capsys, "--model", str(tiny[0]), "--prompt", prompt, "--chat",
                                "--method", "sparq", "--r", "4", "--k", "8", "--max-new-tokens", "4",
                                "--json", str(tmp_path / "r.json"))
    assert report["params"] == {"r": 4, "k": 8, "local_window": 2}
    assert report["prompt_tokens"] > n + 4  # the chat template's turn markers were added


def test_generate_command_runs_dense_layers_whatever_the_method(tiny, tmp_path, capsys):
    flags = ("--model", str(tiny[0]), "--prompt", "the theme of the thesis", "--max-new-tokens", "4", "--page-size",
             "4", "--method", "quest", "--top-pages", "1")
    quest, _, _ = run_generate(capsys, *flags, "--json", str(tmp_path / "q.json"))
    layers = load_gguf(tiny[0])[0].config.num_layers
    every, _, _ = run_generate(capsys, *flags, "--dense-layers", f"0-{layers - 1}", "--json", str(tmp_path / "d.json"))
    dense, _, _ = run_generate(capsys, *flags[:-4], "--json", str(tmp_path / "dense.json"))
    assert quest["layers"] == {} and every["layers"] == {str(i): "dense" for i in range(layers)}
    assert every["attention_bytes_per_token"] == dense["attention_bytes_per_token"] > quest["attention_bytes_per_token"]
    assert every["answer"] == dense["answer"]
    with pytest.raises(SystemExit, match="--dense-layers: layers '99'"):
        kvcache_main(["generate", *flags, "--dense-layers", "99"])


def test_generate_command_against_a_server_gives_the_in_process_answer(tiny, tmp_path, capsys):
    flags = ("--model", str(tiny[0]), "--prompt", "the theme", "--max-new-tokens", "8")
    local, _, _ = run_generate(capsys, *flags, "--json", str(tmp_path / "local.json"))
    with serving() as server:
        remote, _, _ = run_generate(capsys, *flags, "--server", server.target, "--json", str(tmp_path / "remote.json"))
    assert remote["answer"] == local["answer"] and remote["new_tokens"] == local["new_tokens"]
    assert remote["attention_bytes_per_token"] == local["attention_bytes_per_token"]


def test_generate_command_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert kvcache_main(["generate", "--model", str(tmp_path / "gone.gguf"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"kvcache generate: model file {tmp_path / 'gone.gguf'} does not exist\n"
