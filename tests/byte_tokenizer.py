"""A stand-in tokenizer for eval tests on tiny random models: token = byte mod the vocabulary."""


class ByteTokenizer:
    """Encodes bytes mod `vocab_size`; decodes to digits, so a passkey answer is some 5-digit string."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids) -> str:
        return "".join(str(t % 10) for t in ids)
