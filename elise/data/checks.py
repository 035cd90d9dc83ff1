"""The checks of a clip's text that need no audio, shared by preparation (``elise.data.prepare``)
and pre-encoded data (``elise.data.codes``): a bad text is a skip with one of ``REASONS``."""

from __future__ import annotations

import re

from elise.errors import one_line
from elise.text import Tokenizer, encode_prompt

REASONS = (
    "bad_metadata",
    "duplicate_id",
    "empty_text",
    "unspeakable_text",
    "untokenizable_text",
    "missing_file",
    "unreadable_audio",
    "empty_audio",
    "silent_audio",
    "too_short",
    "too_long",
)


_ALNUM = re.compile(r"[^\W_]")  # a letter or digit (what str.isalnum accepts)


class Skip(Exception):
    """An item is bad: ``reason`` (one of ``REASONS``) and a short ``detail``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def text_problem(text: str) -> tuple[str, str] | None:
    """(reason, detail) of an empty text or one without a letter or digit, else None (``text``
    already normalised)."""
    if not text:
        return "empty_text", "no text"
    if not _ALNUM.search(text):
        return "unspeakable_text", f"no letter or digit in {text[:40]!r}"
    return None


def check_text(text: str) -> None:
    """Raise Skip when ``text_problem`` finds one."""
    problem = text_problem(text)
    if problem is not None:
        raise Skip(*problem)


def check_ids(tokenizer: Tokenizer, ids: list[int]) -> None:
    """Raise Skip (untokenizable_text) for no ids, ids outside the vocabulary, or the unknown token."""
    vocab = getattr(tokenizer, "vocab_size", None)
    if not ids or (vocab is not None and max(ids) >= vocab):
        raise Skip("untokenizable_text", "tokenizer returned no ids or ids outside its vocabulary")
    unk = unk_id(tokenizer)
    if unk is not None and unk in ids:
        raise Skip("untokenizable_text", "tokenizer maps part of the text to its unknown token")


def text_ids(tokenizer: Tokenizer, text: str, speaker: int) -> list[int]:
    """Token ids of the prompt ``[speaker]text`` (BOS/EOS), after every text check; raises Skip."""
    check_text(text)
    try:
        ids = encode_prompt(tokenizer, text, speaker)
    except Exception as err:  # tokenizers raise various types on input they cannot take
        raise Skip("untokenizable_text", f"{type(err).__name__}: {one_line(err)}") from err
    check_ids(tokenizer, ids)
    return ids


def unk_id(tokenizer: Tokenizer) -> int | None:
    """The unknown-token id of an HF tokenizer's model (BPE/WordPiece), if it has one."""
    tok = getattr(tokenizer, "_tok", None)
    unk = getattr(getattr(tok, "model", None), "unk_token", None)
    return tok.token_to_id(unk) if tok is not None and unk else None
