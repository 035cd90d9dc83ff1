"""Text tokenizers: a byte-level one that needs no files, and HF ``tokenizer.json`` files.

Both encode the prompt ``[{speaker}]{text}`` with BOS/EOS around it (for HF tokenizers the
post-processor of the file adds them, as CSM's and Marvis's do; ``HFTokenizer`` adds what it lacks).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# special tokens that start / end a prompt in the tokenizers CSM-style models use (Llama 3, SmolLM2, ...)
BOS_TOKENS = ("<|begin_of_text|>", "<s>")  # SmolLM2 (Marvis) has none: its BOS comes from the model config
EOS_TOKENS = ("<|end_of_text|>", "</s>", "<|endoftext|>")


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
    """A Hugging Face ``tokenizer.json`` (a file, or a model directory holding one).

    CSM's prompt is ``<bos>[speaker]text<eos>``. A file whose post-processor does not add BOS or
    EOS (a stock Llama-3.2 ``tokenizer.json`` adds BOS only) gets the missing ones added here, said
    in one log line with their ids. ``bos_id``/``eos_id`` are the ids the model expects (from its
    config); when None they are found among the file's special tokens.
    """

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self._setup(path.read_text(encoding="utf-8"), str(path), bos_id, eos_id)
        self.path: Path | None = path  # None when built from a JSON string

    @classmethod
    def from_json(cls, text: str, bos_id: int | None = None, eos_id: int | None = None) -> HFTokenizer:
        self = cls.__new__(cls)
        self._setup(text, "json", bos_id, eos_id)
        self.path = None
        return self

    def _setup(self, text: str, spec: str, bos_id: int | None, eos_id: int | None) -> None:
        from tokenizers import Tokenizer

        self.json, self.spec = text, spec
        self._tok = Tokenizer.from_str(text)
        self.vocab_size = self._tok.get_vocab_size()
        self._prepend: list[int] = []
        self._append: list[int] = []
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        added = []
        adds_bos = len(with_specials) > len(plain) and with_specials[0] != plain[0]
        adds_eos = len(with_specials) > len(plain) and with_specials[-1] != plain[-1]
        self.bos_id = with_specials[0] if adds_bos else self._special(bos_id, BOS_TOKENS)
        self.eos_id = with_specials[-1] if adds_eos else self._special(eos_id, EOS_TOKENS)
        if not adds_bos and self.bos_id is not None:
            self._prepend = [self.bos_id]
            added.append(f"BOS {self.bos_id} ({self._tok.id_to_token(self.bos_id)})")
        if not adds_eos and self.eos_id is not None:
            self._append = [self.eos_id]
            added.append(f"EOS {self.eos_id} ({self._tok.id_to_token(self.eos_id)})")
        missing = [name for name, i in (("BOS", self.bos_id), ("EOS", self.eos_id)) if i is None]
        if missing:
            log.warning(
                "tokenizer %s adds no %s and has no known token for it: prompts lack it "
                "(CSM prompts are <bos>[speaker]text<eos>)",
                spec,
                " or ".join(missing),
            )
        if added:
            log.info(
                "tokenizer %s does not add %s itself: elise adds them (CSM prompts are <bos>[speaker]text<eos>)",
                spec,
                " and ".join(added),
            )

    def _special(self, given: int | None, names: tuple[str, ...]) -> int | None:
        if given is not None:
            return int(given)
        return next((i for n in names if (i := self._tok.token_to_id(n)) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._prepend + list(self._tok.encode(text, add_special_tokens=True).ids) + self._append

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


Tokenizer = ByteTokenizer | HFTokenizer


def build_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """``None``/``"bytes"`` -> ByteTokenizer; a path to tokenizer.json or a directory -> HFTokenizer."""
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def encode_prompt(tokenizer: Tokenizer, text: str, speaker: int | str = 0) -> list[int]:
    """Token ids of ``[{speaker}]{text}`` with BOS/EOS."""
    return tokenizer.encode(format_prompt(text, speaker))
