"""Preparation: source items -> checked, decoded, Mimi-encoded (cached) ``Example`` records + report.

``prepare(data_cfg, codec, tokenizer)`` reads the source's metadata, skips bad items (counted by
reason, or ``BadItem`` in strict mode), encodes every clip not yet in the code cache in batches of
``codec.batch_size``, assigns the train/val split and writes ``prepare_report.json``. Per-item
errors never stop the run; a run killed half-way resumes from the cache (see ``elise.data.cache``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from elise.codec.base import Codec
from elise.config import conf_defaults, group_options
from elise.data.audio import TARGET_SR, AudioError, read_audio
from elise.data.cache import AudioInfo, CodeCache, audio_info, source_fingerprint
from elise.data.items import Example, PreparedData
from elise.data.sources import RawItem, load_items, speaker_id, speaker_map
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


UNNAMED_SPEAKER = "(no speaker: id 0)"

# Clips are collected for this many codec batches, then sorted by length and encoded (less padding).
ENCODE_WINDOW = 8


class BadItem(ValueError):
    """Strict mode: the first bad item (message: ``<id>: <reason> (<detail>)``)."""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def data_settings(data_cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The data config (dict or DictConfig) as a plain dict with the defaults of its source's
    yaml (``conf/data/<source>.yaml``, which extends ``conf/data/default.yaml``) filled in."""
    if not isinstance(data_cfg, dict):
        from omegaconf import OmegaConf

        data_cfg = cast(dict, OmegaConf.to_container(data_cfg, resolve=True, throw_on_missing=True))
    data_cfg = dict(data_cfg or {})
    source = data_cfg.get("source") or "sample"
    defaults = conf_defaults(f"data/{source}" if source in group_options("data") else "data/default")
    cfg = dict(defaults)
    for key, value in data_cfg.items():
        if value is not None or defaults.get(key) is None:  # null keeps a non-null default
            cfg[key] = value
    return cfg


def prepare(
    data_cfg: Mapping[str, Any] | Any,
    codec: Codec,
    tokenizer: Tokenizer,
    strict: bool = False,
    progress: bool = True,
) -> PreparedData:
    """Prepare the data named by ``data_cfg`` (see conf/data/*.yaml) for training.

    ``progress`` shows a progress bar and prints the report table (the report JSON is always written).

    Raises:
        FileNotFoundError / DataUnavailable / ValueError: the source cannot be read at all.
        BadItem: ``strict`` (or ``data.strict``) and an item is bad.
    """
    start = time.perf_counter()
    cfg = data_settings(data_cfg)
    items = load_items(cfg)
    settings = f"sr={codec.sample_rate}|nq={codec.num_codebooks}"
    cache = CodeCache(cfg["cache_dir"], codec.identity, settings)
    speakers = speaker_map([it.speaker for it in items if it.error is None])
    run = _Run(cfg, codec, tokenizer, cache, speakers, strict or bool(cfg["strict"]))
    with _progress_bar(progress, len(items)) as advance:
        for n, item in enumerate(items, start=1):
            run.add(item)
            if len(run.pending) >= run.batch_size * ENCODE_WINDOW:
                run.flush()
            advance(n, run.encoded)
        run.flush()
        advance(len(items), run.encoded)
    splits = assign_splits(
        [r["id"] for r in run.kept], cfg["val_fraction"], cfg["val_count"], cfg["split_seed"]
    )
    examples = [
        Example(
            id=r["id"],
            text=r["text"],
            speaker=r["speaker"],
            text_ids=r["text_ids"],
            codes_path=str(cache.path(r["key"])),
            frames=run.frames[r["key"]],
            split=splits[r["id"]],
            group=r["group"],
        )
        for r in run.kept
    ]
    report = _report(cfg, run, examples, codec, cache, time.perf_counter() - start)
    _write_json(cache.root / "prepare_report.json", report)
    if progress:
        print_report(report)
    return PreparedData(examples, report, cache.root)


class _Run:
    """State of one preparation pass: kept records, skips, the batch waiting to be encoded."""

    def __init__(
        self, cfg: dict, codec: Codec, tokenizer: Tokenizer, cache: CodeCache, speakers: dict, strict: bool
    ):
        self.cfg, self.codec, self.tokenizer, self.cache, self.strict = cfg, codec, tokenizer, cache, strict
        self.speakers: dict[str, int] = speakers
        self.kept: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.frames: dict[str, int] = {}  # cache key -> frames, for cached and newly encoded clips
        self.pending: dict[str, np.ndarray] = {}  # cache key -> wav [N], waiting for a batch
        self.seen: set[str] = set()
        self.encoded = 0
        self.cached = 0
        self.seconds = 0.0
        self.batch_size = max(1, int(getattr(codec, "batch_size", 8) or 8))

    def add(self, item: RawItem) -> None:
        try:
            self._add(item)
        except _Skip as skip:
            self._skip(item.id, skip.reason, skip.detail)
        except (AudioError, OSError) as err:
            self._skip(item.id, "unreadable_audio", one_line(err))
        except Exception as err:  # a per-item failure must not end a long run; it is reported instead
            self._skip(item.id, "unreadable_audio", f"{type(err).__name__}: {one_line(err)}")

    def _add(self, item: RawItem) -> None:
        if item.error is not None:
            raise _Skip(*item.error)
        # an id counts as used even when its first item is bad: which of two clips is "the" one is unclear
        if item.id in self.seen:
            raise _Skip("duplicate_id", "id already used by an earlier item")
        self.seen.add(item.id)
        text = " ".join(item.text.split())
        speaker = speaker_id(item.speaker, self.speakers)
        text_ids = self._text_ids(text, speaker)
        info, wav, src = self._audio(item)
        key = self.cache.key(info.sha)
        if key not in self.frames:
            frames = self.cache.frames(key, self.codec.num_codebooks)
            if frames is not None:
                self.frames[key] = frames
                self.cached += 1
            elif key not in self.pending:
                self.pending[key] = wav if wav is not None else read_audio(src)
        self.seconds += info.num_samples / TARGET_SR
        self.kept.append(
            {
                "id": item.id,
                "text": text,
                "speaker": speaker,
                "speaker_name": item.speaker,
                "group": item.group,
                "text_ids": text_ids,
                "key": key,
            }
        )

    def _text_ids(self, text: str, speaker: int) -> list[int]:
        if not text:
            raise _Skip("empty_text", "no text")
        if not any(ch.isalnum() for ch in text):
            raise _Skip("unspeakable_text", f"no letter or digit in {text[:40]!r}")
        try:
            ids = encode_prompt(self.tokenizer, text, speaker)
        except Exception as err:  # tokenizers raise various types on input they cannot take
            raise _Skip("untokenizable_text", f"{type(err).__name__}: {one_line(err)}") from err
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if not ids or (vocab is not None and max(ids) >= vocab):
            raise _Skip("untokenizable_text", "tokenizer returned no ids or ids outside its vocabulary")
        unk = _unk_id(self.tokenizer)
        if unk is not None and unk in ids:
            raise _Skip("untokenizable_text", "tokenizer maps part of the text to its unknown token")
        return ids

    def _audio(self, item: RawItem) -> tuple[AudioInfo, np.ndarray | None, Path | bytes]:
        """Facts of the item's decoded audio (from the audio index when known), checked."""
        if item.audio is None:
            raise _Skip("missing_file", "no audio")
        src = item.audio() if callable(item.audio) else item.audio
        if isinstance(src, Path) and not src.is_file():
            raise _Skip("missing_file", str(src))
        fingerprint = source_fingerprint(src)
        info, wav = self.cache.audio_index.get(fingerprint), None
        if info is None:
            wav = read_audio(src)  # [N] float32 at 24 kHz
            info = audio_info(wav)
            self.cache.audio_index.add(fingerprint, info)
        seconds = info.num_samples / TARGET_SR
        if info.num_samples == 0:
            raise _Skip("empty_audio", "0 samples")
        if info.peak < float(self.cfg["silence_threshold"]):
            raise _Skip("silent_audio", f"peak {info.peak:.2e} < {self.cfg['silence_threshold']}")
        if seconds < float(self.cfg["min_seconds"]):
            raise _Skip("too_short", f"{seconds:.2f} s < {self.cfg['min_seconds']} s")
        if seconds > float(self.cfg["max_seconds"]):
            raise _Skip("too_long", f"{seconds:.2f} s > {self.cfg['max_seconds']} s")
        return info, wav, src

    def _skip(self, item_id: str, reason: str, detail: str) -> None:
        if self.strict:
            raise BadItem(f"{item_id}: {reason} ({detail})" if detail else f"{item_id}: {reason}")
        self.skipped.append({"id": item_id, "reason": reason, "detail": detail})

    def flush(self) -> None:
        """Encode the pending clips, sorted by length, in batches of ``batch_size``; cache each batch.

        Sorting a window of several batches keeps padding small; each batch is written as soon as it
        is encoded, so a kill loses at most one batch of work.
        """
        order = sorted(self.pending, key=lambda k: len(self.pending[k]))
        for start in range(0, len(order), self.batch_size):
            keys = order[start : start + self.batch_size]
            self._encode(keys, [self.pending.pop(k) for k in keys])

    def _encode(self, keys: list[str], wavs: list[np.ndarray]) -> None:
        lengths = torch.tensor([len(w) for w in wavs])  # [B]
        batch = torch.zeros(len(wavs), 1, int(lengths.max()))  # [B, 1, N] right-padded
        for i, w in enumerate(wavs):
            batch[i, 0, : len(w)] = torch.from_numpy(w)
        device = _device(self.codec)
        with torch.no_grad():
            codes, frames = self.codec.encode(batch.to(device), lengths.to(device))  # [B, K, T], [B]
        codes_np, lengths_f = codes.cpu().numpy(), frames.cpu().tolist()
        for i, key in enumerate(keys):
            self.cache.save(key, codes_np[i, :, : lengths_f[i]])  # [K, frames_i]
            self.frames[key] = int(lengths_f[i])
        self.encoded += len(keys)


def assign_splits(
    ids: Iterable[str], val_fraction: float = 0.05, val_count: int | None = None, seed: int = 0
) -> dict[str, str]:
    """``id -> "train" | "val"`` by a seeded hash of each id.

    With ``val_fraction`` an id is in val when its hash (a number in [0, 1)) is below the fraction,
    whatever the other ids are, so adding or skipping items never moves it. With ``val_count`` the
    ids with the smallest hashes are val. At least one val item (and one train item) is kept when
    there are two or more ids, unless ``val_fraction`` or ``val_count`` is explicitly 0.
    """
    ids = list(ids)
    score = {i: _unit_hash(f"{seed}:{i}") for i in ids}
    order = sorted(ids, key=lambda i: (score[i], i))
    if len(ids) < 2:
        val: set[str] = set()
    elif val_count is not None:
        val = set(order[: min(max(int(val_count), 0), len(ids) - 1)])
    else:
        val = {i for i in ids if score[i] < float(val_fraction)}
        if not val and float(val_fraction) > 0:
            val = {order[0]}
        if len(val) == len(ids):
            val.discard(order[-1])
    return {i: "val" if i in val else "train" for i in ids}


def _unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


def _report(
    cfg: dict, run: _Run, examples: list[Example], codec: Codec, cache: CodeCache, secs: float
) -> dict:
    counts = dict.fromkeys(REASONS, 0)
    for s in run.skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    names = sorted({r["speaker_name"] for r in run.kept if r["speaker_name"] is not None})
    clips = {n: 0 for n in names}
    for r in run.kept:
        name = r["speaker_name"] if r["speaker_name"] is not None else UNNAMED_SPEAKER
        clips[name] = clips.get(name, 0) + 1
    return {
        "source": cfg["source"],
        "total": len(run.kept) + len(run.skipped),
        "kept": len(examples),
        "train": sum(e.split == "train" for e in examples),
        "val": sum(e.split == "val" for e in examples),
        "hours": round(run.seconds / 3600, 4),
        "skipped": counts,
        "items": run.skipped,
        "encoded": run.encoded,
        "cached": run.cached,
        "speakers": {n: run.speakers[n] for n in names},  # name -> id (the `speaker=` of synthesis)
        "speaker_clips": clips,  # name -> kept clips (clips without a speaker: UNNAMED_SPEAKER, id 0)
        "codec": codec.identity,
        "cache_dir": str(cache.root),
        "seconds": round(secs, 3),
    }


def print_report(report: dict) -> None:
    """The report as a rich table: kept/train/val, then the count of each skip reason that occurred."""
    from rich.console import Console
    from rich.table import Table

    hours = report["hours"]
    table = Table(title=f"data: {report['source']}")
    table.add_column("items")
    table.add_column("count", justify="right")
    for name in ("total", "kept", "train", "val", "encoded", "cached"):
        table.add_row(name, str(report[name]))
    table.add_row("audio kept", f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min")
    for reason, count in report["skipped"].items():
        if count:
            table.add_row(f"skipped: {reason}", str(count), style="yellow")
    speakers = report.get("speakers", {})
    for name, count in list(report.get("speaker_clips", {}).items())[:20]:
        label = f"speaker {name} (id {speakers[name]})" if name in speakers else name
        table.add_row(label, str(count))
    Console().print(table)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _progress_bar:
    """Context manager yielding ``advance(done, encoded)``; a rich progress bar when enabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self) -> Callable[[int, int], None]:
        if not self.enabled:
            return lambda done, encoded: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
        )
        self.bar.start()
        task = self.bar.add_task("preparing", total=self.total)

        def advance(done: int, encoded: int) -> None:
            self.bar.update(task, completed=done, description=f"preparing (encoded {encoded})")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


def _device(codec: Codec) -> torch.device:
    for t in itertools.chain(codec.parameters(), codec.buffers()):
        return t.device
    return torch.device("cpu")


def _unk_id(tokenizer: Tokenizer) -> int | None:
    """The unknown-token id of an HF tokenizer's model (BPE/WordPiece), if it has one."""
    tok = getattr(tokenizer, "_tok", None)
    unk = getattr(getattr(tok, "model", None), "unk_token", None)
    return tok.token_to_id(unk) if tok is not None and unk else None
