"""The ``data.source`` dispatcher: a data config -> the source's raw items (``load_items``).

Apart from ``elise.data.sources`` (the readers) so that sources built on those readers (``folder``
writes a manifest and reads it back) do not import their own dispatcher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elise.data.folder import read_folder
from elise.data.sources import (
    DEFAULT_HF_NAME,
    RawItem,
    read_hf,
    read_ljspeech,
    read_manifest,
    sample_root,
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


def _required(cfg: Mapping[str, Any], key: str, source: str) -> str:
    value = cfg.get(key)
    if not value:
        raise ValueError(f"data.source={source} needs data.{key}=<...>")
    return str(value)


# --- ljspeech / sample -------------------------------------------------------------------------
