"""Shared by the tests that run `kvcache eval` on tiny random models: a stand-in tokenizer, and the model served in
place of SmolLM2."""


class ByteTokenizer:
    """Encodes bytes mod `vocab_size`; decodes to digits, so a passkey answer is some 5-digit string."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids) -> str:
        return "".join(str(t % 10) for t in ids)


def use_model(monkeypatch, model) -> None:
    """Make the CLI's load_model return `model` with a ByteTokenizer of its vocabulary."""
    from kvcache.engine import load

    monkeypatch.setattr(load, "load_model", lambda path=None: (model, ByteTokenizer(model.config.vocab_size)))
