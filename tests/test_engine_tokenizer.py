"""The tokenizer built from SmolLM2's GGUF metadata: round trips, known ids, the chat template, streaming."""

from __future__ import annotations

import pytest

from kvcache.engine.errors import UnsupportedModel
from kvcache.engine.gguf_loader import GGUFModelFile
from kvcache.engine.load import smollm2_path
from kvcache.engine.tokenizer import CHATML_TEMPLATE, StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def gguf_file() -> GGUFModelFile:
    return GGUFModelFile(smollm2_path())


@pytest.fixture(scope="module")
def tok(gguf_file) -> Tokenizer:
    return gguf_file.tokenizer()


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  two leading spaces, three trailing   ",
    "tabs\tand\nnewlines\r\n\n  indented",
    "naïve café — 東京タワー, Ελληνικά, привет",
    "emoji 🚀 and a family 👩‍👩‍👧 and a flag 🇫🇷",
    "digits 2024, pi 3.14159, 1e-5",
    "def f(x):\n    return x ** 2  # code\n",
    "",
])
def test_encode_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_vocabulary_size_and_special_ids_come_from_the_metadata(tok, gguf_file):
    meta = gguf_file.metadata
    assert tok.vocab_size == len(meta["tokenizer.ggml.tokens"]) == 49152
    assert tok.eos_id == meta["tokenizer.ggml.eos_token_id"] == 2
    assert tok.token_id("<|endoftext|>") == 0
    assert tok.token_id("<|im_start|>") == 1
    assert tok.token_id("<|im_end|>") == 2
    assert tok.stop_ids >= {0, 2}
    assert not tok.add_bos  # SmolLM2 prompts start without a BOS token


def test_special_tokens_in_text_become_single_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, *tok.encode("user\nhi"), 2]


def test_known_ids_of_smollm2s_default_system_prompt(tok):
    # The ids Hugging Face's SmolLM2 tokenizer gives the chat template's default system turn.
    text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert tok.encode(text) == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                                411, 407, 19712, 8182, 2, 198]


def test_words_are_byte_level_bpe_tokens_with_the_space_marker(tok):
    ids = tok.encode("Hello world")
    assert [tok.backend.id_to_token(i) for i in ids] == ["Hello", "Ġworld"]


def test_digits_are_split_one_by_one(tok):
    # SmolLM2's pre-tokenizer ("smollm") isolates every digit before BPE.
    ids = tok.encode("year 2024")
    assert [tok.backend.id_to_token(i) for i in ids] == ["year", "Ġ", "2", "0", "2", "4"]


def test_chat_prompt_uses_the_files_template_with_its_default_system_turn(tok):
    text = tok.render_chat("What is the capital of France?")
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_chat("What is the capital of France?")
    assert ids == tok.encode(text)
    assert ids[-4:] == [1, *tok.encode("assistant\n")]


def test_chat_with_a_system_message_replaces_the_default_one(tok):
    text = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_is_the_template_when_the_file_has_none(gguf_file):
    meta = {k: v for k, v in gguf_file.metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.render_chat("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "Tokyo is 東京 🚀!"
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens held back the bytes of a split character


@pytest.mark.parametrize(("key", "value", "message"), [
    ("tokenizer.ggml.model", "llama", "only byte-level BPE"),
    ("tokenizer.ggml.pre", "qwen9", "pre-tokenizer 'qwen9'"),
])
def test_tokenizers_it_cannot_rebuild_are_refused(gguf_file, key, value, message):
    with pytest.raises(UnsupportedModel, match=message):
        Tokenizer.from_gguf_metadata({**gguf_file.metadata, key: value})
