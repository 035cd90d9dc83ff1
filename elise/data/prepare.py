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
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from elise.codec.base import Codec
from elise.config import conf_defaults, group_options
from elise.data.audio import TARGET_SR, AudioError
from elise.data.cache import AudioInfo, CodeCache, decode_job, source_fingerprint
from elise.data.checks import Skip
from elise.data.checks import text_ids as check_text_ids
from elise.data.items import Example, PreparedData
from elise.data.load import list_items
from elise.data.report import prepare_report, print_report, write_json
from elise.data.shards import ShardStore, index_batch, write_index
from elise.data.sources import RawItem, speaker_id
from elise.data.split import assign_splits
from elise.errors import one_line
from elise.text import Tokenizer, encode_prompt

# Clips are collected for this many codec batches, then sorted by length and encoded (less padding).
ENCODE_WINDOW = 8


class BadItem(ValueError):
    """Strict mode: the first bad item (message: ``<id>: <reason> (<detail>)``)."""


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
    num_workers: int = 0,
    shard: int = 0,
    num_shards: int = 1,
) -> PreparedData:
    """Prepare the data named by ``data_cfg`` (see conf/data/*.yaml) for training.

    ``progress`` shows a progress bar and prints the report table (the report JSON is always written).
    ``num_workers`` processes decode and resample the clips (0: this process). ``shard`` of
    ``num_shards``: this run takes items ``shard, shard + num_shards, ...`` and writes its part of the
    result; the run that finds every part written merges them (same examples, codes and report
    counts as one run over all items) and returns them, the others return no examples.

    Raises:
        FileNotFoundError / DataUnavailable / ValueError: the source cannot be read at all.
        BadItem: ``strict`` (or ``data.strict``) and an item is bad.
    """
    start = time.perf_counter()
    cfg = data_settings(data_cfg)
    shard, num_shards = int(shard), int(num_shards)
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"prepare.shard must be in [0, prepare.num_shards), got {shard} of {num_shards}")
    settings = f"sr={codec.sample_rate}|nq={codec.num_codebooks}"
    done = _finished_stream(cfg, dataset_name(cfg, codec.identity, settings, tokenizer))
    if done is not None:
        if progress:
            print(f"{done.index} is whole: the stream is not read again (delete it to read the stream anew)")
            print_report(done.report)
        return done
    listing = list_items(cfg)
    cache = open_store(
        cfg, codec.identity, settings, writer="w0" if num_shards == 1 else f"s{shard}of{num_shards}"
    )
    speakers = listing.speakers
    run = _Run(cfg, codec, tokenizer, cache, speakers, strict or bool(cfg["strict"]))
    mine = ((n, it) for n, it in enumerate(listing.items) if n % num_shards == shard)
    total = None if listing.total is None else len(range(shard, listing.total, num_shards))
    with _progress_bar(progress, total) as advance, _decoder(num_workers) as decode:
        run.process(mine, decode, advance)
    part = run.part()
    name = dataset_name(cfg, codec.identity, settings, tokenizer)
    if num_shards > 1:
        parts = _exchange_parts(cache.root / "parts", f"{name}-of{num_shards}", shard, num_shards, part)
        if parts is None:
            if progress:
                print(f"slice {shard} of {num_shards} done; the last slice to finish writes the index")
            return PreparedData([], {"slice": shard, "num_shards": num_shards}, cache.root)
    else:
        parts = [part]
    secs = time.perf_counter() - start
    return _finish(cfg, parts, codec, cache, speakers, name, run.strict, secs, progress)


def _finished_stream(cfg: dict, name: str) -> PreparedData | None:
    """A streamed source (``data.streaming``) whose shard-store index is whole: that result (its
    report and index; no examples, training reads the index), so training on a prepared stream does
    not read the whole stream again. None otherwise (the npy store keeps no index)."""
    if not cfg.get("streaming") or str(cfg.get("store") or "npy") != "shards":
        return None
    index = index_path(cfg["cache_dir"], name)
    side = index.with_suffix(".json")
    if not (index.is_file() and side.is_file()):
        return None
    report = json.loads(side.read_text(encoding="utf-8")).get("report") or {}
    return PreparedData([], report, index.parent, index)


def open_store(cfg: dict, codec_identity: str, settings: str, writer: str = "w0") -> CodeCache:
    """The code store ``data.store`` names: ``npy`` (one file per clip) or ``shards``."""
    store = str(cfg.get("store") or "npy")
    if store == "npy":
        return CodeCache(cfg["cache_dir"], codec_identity, settings)
    if store == "shards":
        return ShardStore(
            cfg["cache_dir"], codec_identity, settings, writer, float(cfg.get("shard_mb") or 256)
        )
    raise ValueError(f"data.store must be npy or shards, got {store!r}")


# data keys that change which items are kept, their text or split (part of the index's name)
ITEM_KEYS = (
    "source", "name", "path", "root", "split", "speaker_column", "min_seconds", "max_seconds",
    "silence_threshold", "val_fraction", "val_count", "split_seed", "max_items", "store",
)  # fmt: skip


def dataset_name(cfg: dict, codec_identity: str, settings: str, tokenizer: Tokenizer) -> str:
    """Name of a prepared set's index and parts: a hash of the item keys, the codec and the tokenizer."""
    probe = encode_prompt(tokenizer, "Probe: the quick brown fox, 0123 \u00e9\u00df.", 0)
    spec = {k: cfg.get(k) for k in ITEM_KEYS} | {"codec": codec_identity, "settings": settings, "tok": probe}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def index_path(cache_dir: str | Path, name: str) -> Path:
    return Path(cache_dir).expanduser() / f"index-{name}.arrow"


def find_index(data_cfg: Mapping[str, Any] | Any, codec: Codec | None, tokenizer: Tokenizer) -> Path | None:
    """Where ``prepare`` writes the clip index of this data (None: the npy store has none)."""
    cfg = data_settings(data_cfg)
    if str(cfg.get("store") or "npy") != "shards":
        return None
    assert codec is not None
    settings = f"sr={codec.sample_rate}|nq={codec.num_codebooks}"
    return index_path(cfg["cache_dir"], dataset_name(cfg, codec.identity, settings, tokenizer))


def index_pointer(
    data_cfg: Mapping[str, Any] | Any, codec_cfg: Mapping[str, Any], tokenizer: Tokenizer
) -> Path:
    """A file naming the clip index of this data prepared with the codec ``codec_cfg`` describes
    (name + settings, runtime keys dropped): a training rank finds the index its node's
    ``prepare_data`` wrote without building the codec (``find_index`` needs the built codec's
    identity, which for Mimi means loading its weights)."""
    from elise.codec import RUNTIME_KEYS

    cfg = data_settings(data_cfg)
    codec = {k: v for k, v in dict(codec_cfg).items() if k not in RUNTIME_KEYS or k == "name"}
    probe = encode_prompt(tokenizer, "Probe: the quick brown fox, 0123 \u00e9\u00df.", 0)
    spec = {k: cfg.get(k) for k in ITEM_KEYS} | {"codec": codec, "tok": probe}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg["cache_dir"]).expanduser() / f"index-for-{key}.json"


def _exchange_parts(folder: Path, name: str, shard: int, num_shards: int, part: dict) -> list[dict] | None:
    """Write this slice's part; all parts when every slice has written its own, else None."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}-{shard}.json", part)
    paths = [folder / f"{name}-{i}.json" for i in range(num_shards)]
    if not all(p.is_file() for p in paths):
        return None
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def _finish(
    cfg: dict,
    parts: list[dict],
    codec: Codec,
    cache: CodeCache,
    speakers: dict[str, int],
    name: str,
    strict: bool,
    secs: float,
    progress: bool,
) -> PreparedData:
    """Merge the parts (item order; an id counts once, as in one run), split, report, write the index."""
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["n"])
    kept, skipped, seen = [], [], set()
    for r in records:
        if not r.get("source_error"):
            if r["id"] in seen:
                r = {
                    "n": r["n"],
                    "id": r["id"],
                    "reason": "duplicate_id",
                    "detail": "id already used by an earlier item",
                }
            seen.add(r["id"])
        if "reason" in r:
            if strict:
                _raise_bad(r)
            skipped.append({"id": r["id"], "reason": r["reason"], "detail": r["detail"]})
        else:
            kept.append(r)
    splits = assign_splits([r["id"] for r in kept], cfg["val_fraction"], cfg["val_count"], cfg["split_seed"])
    shards = isinstance(cache, ShardStore)
    examples = [
        Example(
            id=r["id"],
            text=r["text"],
            speaker=r["speaker"],
            text_ids=r["text_ids"],
            codes_path=str(cache.dir / r["file"])
            if isinstance(cache, ShardStore)
            else str(cache.path(r["key"])),
            frames=r["frames"],
            split=splits[r["id"]],
            group=r["group"],
            row=r["row"] if shards else None,
        )
        for r in kept
    ]
    counts = {k: sum(p[k] for p in parts) for k in ("encoded", "cached")}
    report = prepare_report(cfg, kept, skipped, examples, counts, speakers, codec.identity, cache.root, secs)
    if shards:
        files = sorted({r["file"] for r in kept})
        number = {f: i for i, f in enumerate(files)}
        rows = [
            {**r, "val": splits[r["id"]] == "val", "file": number[r["file"]], "source": r["src"]}
            for r in kept
        ]
        index = index_path(cache.root, name)
        batches = (index_batch(rows[i : i + 65536]) for i in range(0, len(rows), 65536))
        write_index(index, batches, {"files": [f"shards/{f}" for f in files], "report": report})
    write_json(cache.root / "prepare_report.json", report)
    if progress:
        print_report(report)
    return PreparedData(examples, report, cache.root, index if shards else None)


def _raise_bad(record: dict) -> None:
    detail = f" ({record['detail']})" if record["detail"] else ""
    raise BadItem(f"{record['id']}: {record['reason']}{detail}")


class _Run:
    """State of one preparation pass: records in item order, the clips waiting to be encoded."""

    def __init__(
        self, cfg: dict, codec: Codec, tokenizer: Tokenizer, cache: CodeCache, speakers: dict, strict: bool
    ):
        self.cfg, self.codec, self.tokenizer, self.cache, self.strict = cfg, codec, tokenizer, cache, strict
        self.speakers: dict[str, int] = speakers
        self.records: list[dict[str, Any]] = []
        self.frames: dict[str, int] = {}  # cache key -> frames, for cached and newly encoded clips
        self.pending: dict[str, np.ndarray] = {}  # cache key -> wav [N], waiting for a batch
        self.seen: set[str] = set()
        self.encoded = 0
        self.cached = 0
        self.batch_size = max(1, int(getattr(codec, "batch_size", 8) or 8))

    def process(self, items: Iterable[tuple[int, RawItem]], decode: Callable, advance: Callable) -> None:
        """All items (a list or a stream, read once): checks and cache lookups here, decoding by
        ``decode`` (a map over jobs, in order), encoding in windows of ``ENCODE_WINDOW`` batches.
        Items are taken a chunk at a time, so a stream's audio is held one chunk at a time."""
        chunk = self.batch_size * ENCODE_WINDOW
        done = 0
        stream = iter(items)
        while batch := list(itertools.islice(stream, chunk)):
            first = len(self.records)
            begun = [self._begin(n, item) for n, item in batch]
            del batch
            need = [b for b in begun if b is not None and b["job"] is not None]
            for b, result in zip(need, decode([b["job"] for b in need]), strict=True):
                b["decoded"] = result
            for begin in begun:
                if begin is not None:
                    self._guard(begin["n"], begin["item"], self._end, begin)
            bad = [r for r in self.records[first:] if "reason" in r]
            if self.strict and bad:  # the first bad item in item order, not in check order
                _raise_bad(min(bad, key=lambda r: r["n"]))
            done += len(begun)
            if len(self.pending) >= chunk:
                self.flush()
            advance(done, self.encoded)
        self.flush()
        advance(done, self.encoded)

    def _guard(self, n: int, item: RawItem, step: Callable, *args: Any) -> Any:
        try:
            return step(*args)
        except Skip as skip:
            self._skip(n, item.id, skip.reason, skip.detail)
        except (AudioError, OSError) as err:
            self._skip(n, item.id, "unreadable_audio", one_line(err))
        except Exception as err:  # a per-item failure must not end a long run; it is reported instead
            self._skip(n, item.id, "unreadable_audio", f"{type(err).__name__}: {one_line(err)}")
        return None

    def _begin(self, n: int, item: RawItem) -> dict | None:
        """Checks that need no audio; the decode job when the audio facts or codes are not cached."""
        if item.error is not None:
            self._skip(n, item.id, *item.error, source_error=True)
            return None
        # an id counts as used even when its first item is bad: which of two clips is "the" one is unclear
        if item.id in self.seen:
            self._skip(n, item.id, "duplicate_id", "id already used by an earlier item")
            return None
        self.seen.add(item.id)
        return self._guard(n, item, self._start, n, item)

    def _start(self, n: int, item: RawItem) -> dict:
        text = " ".join(item.text.split())
        speaker = speaker_id(item.speaker, self.speakers)
        text_ids = check_text_ids(self.tokenizer, text, speaker)
        if item.audio is None:
            raise Skip("missing_file", "no audio")
        src = item.audio() if callable(item.audio) else item.audio
        if isinstance(src, Path) and not src.is_file():
            raise Skip("missing_file", str(src))
        fingerprint = source_fingerprint(src)
        info = self.cache.audio_index.get(fingerprint)
        if info is not None:
            self._check(info)
        job = None
        if info is None or self._cached(self.cache.key(info.sha)) is None:
            job = (bytes(src), getattr(src, "name", "audio bytes")) if isinstance(src, bytes) else src
        rec = {"n": n, "item": item, "text": text, "speaker": speaker, "text_ids": text_ids, "info": info}
        return rec | {"job": job, "fingerprint": fingerprint, "src": str(getattr(src, "name", src))}

    def _cached(self, key: str) -> int | None:
        if key not in self.frames:
            frames = self.cache.frames(key, self.codec.num_codebooks)
            if frames is None:
                return None
            self.frames[key] = frames
            self.cached += 1
        return self.frames[key]

    def _end(self, b: dict) -> None:
        info, wav = b["info"], None
        if b["job"] is not None:
            result = b["decoded"]
            if isinstance(result[0], str):
                raise Skip(*result)
            wav, decoded = result
            if info is None:
                info = decoded
                self.cache.audio_index.add(b["fingerprint"], info)
                self._check(info)
        key = self.cache.key(info.sha)
        if self._cached(key) is None and key not in self.pending:
            assert wav is not None, "codes not cached, so the job decoded the audio"
            self.pending[key] = wav  # decoded: codes not cached when the job was made
        item = b["item"]
        self.records.append(
            {
                "n": b["n"],
                "id": item.id,
                "text": b["text"],
                "speaker": b["speaker"],
                "speaker_name": item.speaker,
                "group": item.group,
                "text_ids": b["text_ids"],
                "key": key,
                "seconds": info.num_samples / TARGET_SR,
                "src": b["src"],
            }
        )

    def _check(self, info: AudioInfo) -> None:
        seconds = info.num_samples / TARGET_SR
        if info.num_samples == 0:
            raise Skip("empty_audio", "0 samples")
        if info.peak < float(self.cfg["silence_threshold"]):
            raise Skip("silent_audio", f"peak {info.peak:.2e} < {self.cfg['silence_threshold']}")
        if seconds < float(self.cfg["min_seconds"]):
            raise Skip("too_short", f"{seconds:.2f} s < {self.cfg['min_seconds']} s")
        if seconds > float(self.cfg["max_seconds"]):
            raise Skip("too_long", f"{seconds:.2f} s > {self.cfg['max_seconds']} s")

    def _skip(self, n: int, item_id: str, reason: str, detail: str, source_error: bool = False) -> None:
        rec = {"n": n, "id": item_id, "reason": reason, "detail": detail}
        self.records.append(rec | {"source_error": True} if source_error else rec)

    def part(self) -> dict:
        """This run's records with frames (and shard locations), and its encoded/cached counts."""
        if isinstance(self.cache, ShardStore):
            self.cache.close()
        for r in self.records:
            if "key" in r:
                r["frames"] = self.frames[r["key"]]
                if isinstance(self.cache, ShardStore):
                    path, r["row"] = self.cache.location(r["key"])
                    r["file"] = Path(path).name
        return {"records": self.records, "encoded": self.encoded, "cached": self.cached}

    def flush(self) -> None:
        """Encode the pending clips, sorted by length, in batches of ``batch_size``; cache each batch.

        Sorting a window of several batches keeps padding small; each batch is written as soon as it
        is encoded (a shard when it is full), so a kill loses at most one batch (shard) of work.
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


class _decoder:
    """Context manager yielding ``decode(jobs) -> results`` (``elise.data.cache.decode_job``, in
    order): in this process, or in ``num_workers`` spawned processes."""

    def __init__(self, num_workers: int):
        self.num_workers = int(num_workers)

    def __enter__(self) -> Callable[[list], list]:
        if self.num_workers <= 0:
            return lambda jobs: [decode_job(j) for j in jobs]
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"))
        return lambda jobs: list(
            self.pool.map(decode_job, jobs, chunksize=max(1, len(jobs) // (4 * self.num_workers)))
        )

    def __exit__(self, *exc: object) -> None:
        if self.num_workers > 0:
            self.pool.shutdown(cancel_futures=True)


class _progress_bar:
    """Context manager yielding ``advance(done, encoded)``; a rich progress bar when enabled (total
    None: a stream of unknown length, counted without an end)."""

    def __init__(self, enabled: bool, total: int | None):
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
