"""Text tokenizers: a byte-level one that needs no files, and HF ``tokenizer.json`` files.

Both encode the prompt ``[{speaker}]{text}`` with BOS/EOS around it (for HF tokenizers the
post-processor of the file adds them, as CSM's and Marvis's do).
"""

from __future__ import annotations

from pathlib import Path


def format_prompt(text: str, speaker: int | str = 0) -> str:
    return f"[{speaker}]{text}"


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: 0 pad, 1 BOS, 2 EOS, 3..258 bytes (same BOS/EOS ids as SmolLM2)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 259
    spec = "bytes"

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + self.offset for b in text.encode("utf-8")] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (a file, or a model directory holding one)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path: Path | None = path  # None when built from a JSON string
        self.json = path.read_text(encoding="utf-8")
        self._tok = Tokenizer.from_str(self.json)
        self.vocab_size = self._tok.get_vocab_size()
        self.spec = str(path)

    @classmethod
    def from_json(cls, text: str) -> HFTokenizer:
        from tokenizers import Tokenizer

        self = cls.__new__(cls)
        self.path = None
        self.json = text
        self._tok = Tokenizer.from_str(text)
        self.vocab_size = self._tok.get_vocab_size()
        self.spec = "json"
        return self

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


Tokenizer = ByteTokenizer | HFTokenizer


def build_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """``None``/``"bytes"`` -> ByteTokenizer; a path to tokenizer.json or a directory -> HFTokenizer."""
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def encode_prompt(tokenizer: Tokenizer, text: str, speaker: int | str = 0) -> list[int]:
    """Token ids of ``[{speaker}]{text}`` with BOS/EOS."""
    return tokenizer.encode(format_prompt(text, speaker))
