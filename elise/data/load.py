"""The ``data.source`` dispatcher: a data config -> the source's raw items (``load_items``), or
their listing for preparation (``list_items``: a list, or a stream with ``data.streaming=true``).

Apart from ``elise.data.sources`` (the readers) so that sources built on those readers (``folder``
writes a manifest and reads it back) do not import their own dispatcher.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from elise.data.folder import read_folder
from elise.data.sources import (
    DEFAULT_HF_NAME,
    RawItem,
    read_hf,
    read_ljspeech,
    read_manifest,
    sample_root,
    speaker_map,
)

SOURCES = ("elise", "ljspeech", "manifest", "folder", "sample")


def load_items(cfg: Mapping[str, Any]) -> list[RawItem]:
    """Read the metadata of the source named by ``cfg["source"]`` (first ``max_items`` items).

    Raises:
        FileNotFoundError: a configured path/root does not exist.
        DataUnavailable: the hub dataset cannot be fetched.
        ValueError: unknown source or bad option.
    """
    source = cfg.get("source", "sample")
    if source == "sample":
        items = read_ljspeech(sample_root(), speaker_column=False)
    elif source == "ljspeech":
        items = read_ljspeech(_required(cfg, "root", source), cfg.get("speaker_column", "auto"))
    elif source == "manifest":
        items = read_manifest(_required(cfg, "path", source))
    elif source == "folder":
        items = read_folder(cfg)
    elif source == "elise":
        items = read_hf(cfg.get("name") or DEFAULT_HF_NAME, cfg.get("path"), cfg.get("split") or "train")
    else:
        raise ValueError(f"unknown data.source {source!r}; choose one of {', '.join(SOURCES)}")
    max_items = cfg.get("max_items")
    return items if max_items is None else items[: int(max_items)]


@dataclass
class Listing:
    """What preparation reads: the items (a list, or a stream read once), the speaker map over all
    of them, and their count (None: a stream of unknown length)."""

    items: Iterable[RawItem]
    speakers: dict[str, int]
    total: int | None


def list_items(cfg: Mapping[str, Any]) -> Listing:
    """The items of ``cfg``'s source with their speaker map; ``data.streaming=true`` (source elise)
    streams them (``elise.data.stream``). Raises as ``load_items``."""
    if cfg.get("streaming"):
        if cfg.get("source") != "elise":
            raise ValueError(
                f"data.streaming=true streams Hugging Face datasets (data=elise, data=codes), not "
                f"data.source={cfg.get('source')}"
            )
        from elise.data.stream import HFStream

        stream = HFStream(
            cfg.get("name") or DEFAULT_HF_NAME,
            cfg.get("path"),
            cfg.get("split") or "train",
            cfg.get("max_items"),
        )
        pass_ = stream.speakers()
        names, total = pass_ if pass_ is not None else (set(), None)
        return Listing(stream, speaker_map(sorted(names)), total)
    items = load_items(cfg)
    return Listing(items, speaker_map([it.speaker for it in items if it.error is None]), len(items))


def _required(cfg: Mapping[str, Any], key: str, source: str) -> str:
    value = cfg.get(key)
    if not value:
        raise ValueError(f"data.source={source} needs data.{key}=<...>")
    return str(value)


# --- ljspeech / sample -------------------------------------------------------------------------
