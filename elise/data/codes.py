"""Pre-encoded data (``data=codes``): datasets that already hold Mimi codes, trained on without a codec.

``data.path`` is a local folder or a Hugging Face hub id. Accepted:

- a folder of Arrow IPC files (``*.arrow``, file or stream format) with a codes column and a
  text column, read in place (memory-mapped, never copied): what ``elise.bench.data`` generates and
  what ``datasets`` keeps in its cache;
- a ``save_to_disk`` folder, a folder of Parquet files, or a hub id: loaded by ``datasets`` (Parquet
  and hub data become its Arrow cache files, which are then read in place);
- ``data.streaming=true`` with a hub id (or Parquet folder): rows are streamed and written to Arrow
  files of ``data.shard_mb`` MB under ``data.cache_dir`` as they come (no full download); a
  killed run resumes after the last whole file, and a finished stream (``complete.json``) is not
  read again.

The codes column (``data.codes_column``, default: the first of codes, audio_codes, mimi_codes) holds
nested integer lists of shape [32, T] or [T, 32] (``data.codes_layout`` kt / tk; auto tells them
apart by which side is 32, and takes [32, T] when both are), or int16 bytes of [32, T] (our shards).
The text column is ``text``; optional: ``id``, ``speaker`` (or speaker_id / speaker_name), ``group``.

Preparation here is building the clip index (``elise.data.shards``): frames per clip from the
column's list lengths (no codes are read), text ids, the train/val split (``elise.data.split``
over the kept clips, as preparation splits) and the report (kept, skipped: the text checks of
``elise.data.checks`` (empty_text, unspeakable_text, untokenizable_text), too_short, too_long).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elise.data.checks import REASONS, Skip, text_ids, text_problem
from elise.data.items import Example, PreparedData
from elise.data.prepare import data_settings
from elise.data.report import print_report, write_json
from elise.data.shards import INDEX_SCHEMA, ClipIndex, read_ipc, write_index, write_ipc
from elise.data.sources import is_saved_dataset, load_hub, load_saved, parquet_files, speaker_map
from elise.data.split import split_scores, val_mask
from elise.layout import NUM_CODEBOOKS
from elise.text import ByteTokenizer, Tokenizer, encode_prompt, format_prompt

CODES_COLUMNS = ("codes", "audio_codes", "mimi_codes")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "speaker_name")
FRAME_RATE = 12.5  # Mimi frames per second


def codes_index_path(data_cfg: Mapping[str, Any] | Any, tokenizer: Tokenizer) -> Path:
    """Where ``prepare_codes`` writes the index of this dataset (a hash of its settings)."""
    cfg = data_settings(data_cfg)
    keys: tuple[str, ...] = ("path", "split", "streaming", "codes_column", "codes_layout", "min_seconds")
    keys += ("max_seconds",)
    keys += ("val_fraction", "val_count", "split_seed", "max_items")
    probe = encode_prompt(tokenizer, "Probe: the quick brown fox, 0123 \u00e9\u00df.", 0)
    spec = {k: cfg.get(k) for k in keys} | {"tok": probe}
    name = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg["cache_dir"]).expanduser() / f"index-codes-{name}.arrow"


def prepare_codes(
    data_cfg: Mapping[str, Any] | Any, tokenizer: Tokenizer, progress: bool = True
) -> PreparedData:
    """Build the clip index of a pre-encoded dataset, or reuse it when its files and settings are
    unchanged; returns its report and index path (no ``Example`` list: a large set is only ever
    read through the index)."""
    start = time.perf_counter()
    cfg = data_settings(data_cfg)
    path = cfg.get("path")
    if not path:
        raise ValueError("data=codes needs data.path=<hub id | local folder>")
    files = source_files(str(path), cfg)
    cache = Path(cfg["cache_dir"]).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out = codes_index_path(cfg, tokenizer)
    current = _stamps(files)
    side = out.with_suffix(".json")
    if side.is_file() and out.is_file():
        meta = json.loads(side.read_text(encoding="utf-8"))
        if meta.get("stamps") == current:  # same files, same settings: the index is current
            if progress:
                print_report(meta["report"])
            return PreparedData([], meta["report"], cache, out)
    builder = _IndexBuilder(cfg, tokenizer, files)
    # the stamps mark the index current: written only with the final rows (a kill between the two
    # writes below must not leave a current-looking index with the per-id split unfixed)
    write_index(
        out,
        builder.batches(),
        lambda: (
            builder.meta(time.perf_counter() - start, str(path))
            | ({"stamps": current} if builder.moved is None else {})
        ),
    )
    meta = json.loads(side.read_text(encoding="utf-8"))
    if builder.moved is not None:  # the split of the whole set differs from the per-id rule: fix the rows
        table = read_ipc(out)
        column = pa.array(builder.moved, pa.bool_())
        table = table.set_column(table.schema.get_field_index("val"), "val", column)
        meta |= {"stamps": current}
        write_index(out, table.to_batches(), meta)
    report = meta["report"]
    write_json(cache / "prepare_report.json", report)
    if progress:
        print_report(report)
    return PreparedData([], report, cache, out)


def _stamps(files: list[str]) -> list[list]:
    """(path, size, mtime) of each source file: a changed file rebuilds the index."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def examples_of(index_path: Path) -> list[Example]:
    """All clips of an index as ``Example`` records (small sets, tests)."""
    from elise.data.dataset import IndexDataset

    index = ClipIndex(index_path)
    return [e for split in ("train", "val") for e in IndexDataset(index, split).examples]


# ---- where the rows are ---------------------------------------------------------------------


def source_files(path: str, cfg: dict) -> list[str]:
    """Arrow files holding the dataset's rows, in order (see the module docstring)."""
    local = Path(path).expanduser()
    if cfg.get("streaming"):
        return _stream_to_files(path, cfg)
    if local.is_dir() and not is_saved_dataset(local):
        arrow = sorted(local.rglob("*.arrow"))
        if arrow:
            return [str(f) for f in arrow]
    ds = _load(path, cfg)
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    return [c["filename"] for c in ds.cache_files]


def _load(path: str, cfg: dict, streaming: bool = False) -> Any:
    """The rows as a ``datasets`` dataset, through the readers audio sources use (``elise.data.sources``:
    a ``save_to_disk`` folder, the split's parquet files, or the hub with its one-line failure)."""
    from datasets import load_dataset

    local, split = Path(path).expanduser(), cfg.get("split") or "train"
    if not local.exists():
        return load_hub(path, split, streaming=streaming)
    if is_saved_dataset(local):
        ds = load_saved(local, split)
        return ds.to_iterable_dataset() if streaming else ds
    return load_dataset("parquet", data_files=parquet_files(local, split), split="train", streaming=streaming)


def _stream_to_files(path: str, cfg: dict) -> list[str]:
    """Stream the rows into ``<cache_dir>/streamed-<hash>/part-<n>.arrow`` files; resumes after the
    last whole file (each holds the rows that follow the previous ones). ``complete.json`` records a
    finished stream: later runs use its files without opening the stream."""
    split = cfg.get("split") or "train"
    name = hashlib.sha256(f"{path}|{split}".encode()).hexdigest()[:12]
    folder = Path(cfg["cache_dir"]).expanduser() / f"streamed-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    complete = folder / "complete.json"
    if complete.is_file():
        parts = json.loads(complete.read_text(encoding="utf-8"))["parts"]
        if all((folder / f).is_file() for f in parts):
            return [str(folder / f) for f in parts]
    done = sorted(folder.glob("part-*.arrow"))
    skip = sum(read_ipc(f).num_rows for f in done)
    stream = _load(path, cfg, streaming=True).skip(skip)
    limit = float(cfg.get("shard_mb") or 256) * 2**20
    rows: list[dict] = []
    size = 0
    for row in stream:
        rows.append(row)
        size += len(json.dumps(row.get(_codes_key(row.keys(), cfg)), separators=(",", ":")))
        if size >= limit:
            done.append(_write_part(folder, len(done), rows))
            rows, size = [], 0
    if rows:
        done.append(_write_part(folder, len(done), rows))
    write_json(complete, {"path": path, "split": split, "parts": [f.name for f in done]})
    return [str(f) for f in done]


def _write_part(folder: Path, n: int, rows: list[dict]) -> Path:
    path = folder / f"part-{n:06d}.arrow"
    write_ipc(path, pa.Table.from_pylist(rows))
    return path


def _codes_key(names: Any, cfg: dict) -> str:
    names = list(names)
    wanted = cfg.get("codes_column")
    column = wanted or next((c for c in CODES_COLUMNS if c in names), None)
    if column is None or column not in names:
        raise ValueError(f"no codes column ({wanted or ' / '.join(CODES_COLUMNS)}) among {names}")
    return column


# ---- the index ------------------------------------------------------------------------------


def _frames_and_layout(col: pa.ChunkedArray, layout: str) -> tuple[np.ndarray, str]:
    """Frames per row (from list lengths or byte counts; the codes are not read) and the layout."""
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return pc.binary_length(col).to_numpy(zero_copy_only=False) // (2 * NUM_CODEBOOKS), "bytes"
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"codes column type {col.type}: expected nested integer lists or int16 bytes")
    outer = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # [N]
    starts = col.offsets.to_numpy()[:-1] - col.offsets[0].as_py()
    inner_all = pc.list_value_length(col.flatten()).to_numpy(zero_copy_only=False)
    inner = np.where(outer > 0, inner_all[np.minimum(starts, max(len(inner_all) - 1, 0))], 0)
    if layout == "auto":
        layout = "kt" if (outer == NUM_CODEBOOKS).all() else "tk" if (inner == NUM_CODEBOOKS).all() else ""
        if not layout:
            raise ValueError(
                f"codes are neither [{NUM_CODEBOOKS}, T] nor [T, {NUM_CODEBOOKS}] lists in every row"
            )
    side = outer if layout == "kt" else inner
    if (side != NUM_CODEBOOKS).any():
        raise ValueError(f"codes_layout={layout}: some rows do not have {NUM_CODEBOOKS} codebooks")
    return (inner if layout == "kt" else outer).astype(np.int64), layout


class _IndexBuilder:
    """One pass over the files, one index batch per file; ``moved`` afterwards: the whole val column
    when the split of the kept ids (``elise.data.split.val_mask``) is not the per-id rule the batches
    were written with (``val_count``, or the at-least-one-val guarantee), else None."""

    def __init__(self, cfg: dict, tokenizer: Tokenizer, files: list[str]):
        self.cfg, self.tokenizer, self.files = cfg, tokenizer, files
        self.counts = dict.fromkeys(REASONS, 0)
        self.items: list[dict] = []
        self.kept = self.train = self.val = 0
        self.seconds = 0.0
        self.layout = str(cfg.get("codes_layout") or "auto")
        self.column = ""
        limit = cfg.get("max_items")
        self.sizes = []
        left = None if limit is None else int(limit)
        for f in files:
            n = read_ipc(f).num_rows
            n = n if left is None else min(n, left)
            left = None if left is None else left - n
            self.sizes.append(n)
        self.speakers = speaker_map(list(self._speaker_names()))
        self.kept_ids: list[str] = []
        self.scores: list[np.ndarray] = []  # split hash of the kept ids, per batch
        self.written: list[np.ndarray] = []  # the val column as written, per batch
        self.moved: np.ndarray | None = None

    def _table(self, i: int) -> pa.Table:
        return read_ipc(self.files[i]).slice(0, self.sizes[i])

    def _ids(self, i: int, table: pa.Table) -> list[str]:
        if "id" in table.column_names:
            return [str(x) for x in table.column("id").to_pylist()]
        first = sum(self.sizes[:i])
        return [f"{first + r:08d}" for r in range(table.num_rows)]

    def _speaker_names(self) -> Iterator[str]:
        seen: set[str] = set()
        for i in range(len(self.files)):
            table = self._table(i)
            col = next((c for c in SPEAKER_COLUMNS if c in table.column_names), None)
            if col is not None:
                for v in pc.unique(table.column(col)).to_pylist():
                    if v is not None and str(v) not in seen:
                        seen.add(str(v))
                        yield str(v)

    def batches(self) -> Iterator[pa.RecordBatch]:
        cfg = self.cfg
        lo, hi = float(cfg["min_seconds"]) * FRAME_RATE, float(cfg["max_seconds"]) * FRAME_RATE
        for i in range(len(self.files)):
            table = self._table(i)
            self.column = self.column or _codes_key(table.column_names, cfg)
            frames, self.layout = _frames_and_layout(table.column(self.column), self.layout)
            ids = self._ids(i, table)
            texts = table.column("text").to_pylist() if "text" in table.column_names else [None] * len(ids)
            spk_col = next((c for c in SPEAKER_COLUMNS if c in table.column_names), None)
            names = table.column(spk_col).to_pylist() if spk_col else [None] * len(ids)
            groups = table.column("group").to_pylist() if "group" in table.column_names else [None] * len(ids)
            keep, speakers, norm = [], [], []
            for r, (text, n) in enumerate(zip(texts, frames.tolist(), strict=True)):
                text = " ".join(text.split()) if isinstance(text, str) else ""
                reason = self._check(text, n, lo, hi)
                if reason is not None:
                    self._skip(ids[r], reason)
                    continue
                speaker = 0 if names[r] is None else self.speakers[str(names[r])]
                keep.append(r)
                norm.append(text)
                speakers.append(speaker)
            token_ids = self._encode(norm, speakers)  # [n] lists, or a ListArray when every prompt encoded
            if not isinstance(token_ids, pa.ListArray):
                good = [k for k, t in enumerate(token_ids) if not isinstance(t, tuple)]
                for k, t in enumerate(token_ids):
                    if isinstance(t, tuple):
                        self._skip(ids[keep[k]], t)
                keep, norm, speakers = (
                    [keep[k] for k in good],
                    [norm[k] for k in good],
                    [speakers[k] for k in good],
                )
                token_ids = pa.array([token_ids[k] for k in good], pa.list_(pa.int32()))
            yield self._batch(i, keep, ids, norm, groups, token_ids, speakers, frames)

    def _skip(self, item_id: str, reason: tuple[str, str]) -> None:
        self.counts[reason[0]] += 1
        self.items.append({"id": item_id, "reason": reason[0], "detail": reason[1]})

    def _check(self, text: str, frames: int, lo: float, hi: float) -> tuple[str, str] | None:
        problem = text_problem(text)  # the checks of preparation (elise.data.checks)
        if problem is not None:
            return problem
        if frames < lo:
            return "too_short", f"{frames / FRAME_RATE:.2f} s < {self.cfg['min_seconds']} s"
        if frames > hi:
            return "too_long", f"{frames / FRAME_RATE:.2f} s > {self.cfg['max_seconds']} s"
        return None

    def _encode(
        self, texts: list[str], speakers: list[int]
    ) -> pa.ListArray | list[list[int] | tuple[str, str]]:
        """Token ids of each prompt ``[speaker]text``. The byte tokenizer's are computed on the whole
        column at once (the same ids as ``ByteTokenizer.encode``); otherwise one prompt at a time
        (``elise.data.checks.text_ids``), where a prompt that fails a check is (reason, detail)."""
        if type(self.tokenizer) is ByteTokenizer:
            prompts = [format_prompt(t, k) for t, k in zip(texts, speakers, strict=True)]
            try:
                arr = pa.array(prompts, pa.string())
            except (pa.ArrowException, UnicodeError):
                arr = None  # a text with unencodable characters: one at a time finds which
            if arr is not None and len(arr):
                tok = self.tokenizer
                offsets = np.frombuffer(arr.buffers()[1], np.int32, count=len(arr) + 1).astype(
                    np.int64
                )  # [n + 1]
                data = (
                    np.frombuffer(arr.buffers()[2], np.uint8, count=int(offsets[-1]))
                    if len(arr)
                    else np.zeros(0)
                )
                rows = np.repeat(np.arange(len(prompts)), np.diff(offsets))  # [bytes] prompt of each byte
                flat = np.empty(len(data) + 2 * len(prompts), np.int32)
                flat[np.arange(len(data)) + 2 * rows + 1] = data.astype(np.int32) + tok.offset
                new = offsets + 2 * np.arange(len(prompts) + 1)  # [n + 1] id offsets
                flat[new[:-1]] = tok.bos_id
                flat[new[1:] - 1] = tok.eos_id
                return pa.ListArray.from_arrays(pa.array(new.astype(np.int32)), pa.array(flat))
        out: list[list[int] | tuple[str, str]] = []
        for text, speaker in zip(texts, speakers, strict=True):
            try:
                out.append(text_ids(self.tokenizer, text, speaker))
            except Skip as skip:
                out.append((skip.reason, skip.detail))
        return out

    def _batch(self, i, keep, ids, texts, groups, token_ids, speakers, frames) -> pa.RecordBatch:
        keep_a = np.asarray(keep, dtype=np.int64)
        kept_ids = [ids[r] for r in keep]
        scores = split_scores(kept_ids, self.cfg["split_seed"])  # [n]
        # the per-id rule (val_fraction); the whole set's rule is applied in meta()
        val = scores < float(self.cfg["val_fraction"]) if self.cfg.get("val_count") is None else scores < 0
        self.kept_ids += kept_ids
        self.scores.append(scores)
        self.written.append(val)
        fr = frames[keep_a].astype(np.int32)
        n_ids = np.diff(token_ids.offsets.to_numpy())
        self.kept += len(keep)
        self.seconds += float(fr.sum()) / FRAME_RATE
        name = Path(self.files[i]).name
        cols = {
            "id": pa.array(kept_ids, pa.string()),
            "text": pa.array(texts, pa.string()),
            "speaker": pa.array(speakers, pa.int32()),
            "group": pa.array([None if groups[r] is None else str(groups[r]) for r in keep], pa.string()),
            "val": pa.array(val, pa.bool_()),
            "text_ids": token_ids.cast(pa.list_(pa.int32())),
            "frames": pa.array(fr, pa.int32()),
            "rows": pa.array((n_ids + fr + 1).astype(np.int32), pa.int32()),
            "seconds": pa.array(fr / FRAME_RATE, pa.float32()),
            "source": pa.array([f"{name}:{r}" for r in keep], pa.string()),
            "file": pa.array(np.full(len(keep), i, np.int32), pa.int32()),
            "row": pa.array(keep_a, pa.int64()),
        }
        return pa.RecordBatch.from_pydict(cols, schema=INDEX_SCHEMA)

    def meta(self, secs: float, where: str) -> dict:
        """The index's side file (after ``batches``): files, codes column, layout, report."""
        cfg = self.cfg
        scores = np.concatenate(self.scores or [np.zeros(0)])
        written = np.concatenate(self.written or [np.zeros(0, dtype=bool)])
        val = val_mask(self.kept_ids, scores, cfg["val_fraction"], cfg.get("val_count"))
        self.val = int(val.sum())
        self.moved = None if np.array_equal(val, written) else val
        files = [os.path.abspath(f) for f in self.files]
        report = self.report(secs, where)
        return {"files": files, "column": self.column or "codes", "layout": self.layout, "report": report}

    def report(self, secs: float, where: str) -> dict:
        names = sorted(self.speakers)
        return {
            "source": "codes",
            "path": where,
            "total": self.kept + len(self.items),
            "kept": self.kept,
            "train": self.kept - self.val,
            "val": self.val,
            "hours": round(self.seconds / 3600, 4),
            "skipped": self.counts,
            "items": self.items[:1000],
            "encoded": 0,
            "cached": self.kept,
            "speakers": {n: self.speakers[n] for n in names},
            "layout": self.layout,
            "seconds": round(secs, 3),
        }
