"""``data.streaming=true``: an audio dataset read as a stream, never downloaded in full.

``data=elise data.name=<hub id> data.streaming=true`` (or ``data.path=<parquet file/folder>``) reads
the rows with ``datasets.load_dataset(..., streaming=True)``: a row's audio is in memory from the
moment it is read until its codes are cached, so preparation holds one chunk of clips at a time.

The result is the one ``data.streaming=false`` gives on the same rows: same ids (the ``id`` column,
else the row number), texts, speaker ids, splits and report. Speaker ids need every speaker name
first (``elise.data.sources.speaker_map``), so ``speakers`` makes one pass over the speaker column
alone before the audio is read: parquet data (local files and the hub's parquet datasets) reads
only that column; a hub dataset in another format is streamed twice (the second time for audio).

Each prepare slice (``prepare.shard``/``num_shards``, torchrun ranks) reads the whole stream and
decodes only its own rows (the global row number names the default ids and orders the result;
``datasets.distributed.split_dataset_by_node`` would hand a node whole files, whose row numbers it
cannot know). A killed run reads the stream again and skips, by the cached audio facts and codes,
every clip it had encoded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from elise.data.sources import (
    DataUnavailable,
    HFColumns,
    RawItem,
    audio_of,
    hf_item,
    is_saved_dataset,
    load_hub,
    load_saved,
    parquet_files,
)

_BATCH = 4096  # rows per batch of the speaker pass


class HFStream:
    """The rows of a Hugging Face audio dataset as ``RawItem`` s, in order, read once per iteration.

    ``name``: hub id (used when ``path`` is None); ``path``: a parquet file/folder or a
    ``save_to_disk`` folder; ``max_items``: the first rows only.

    Raises (when opened): FileNotFoundError, ValueError (no audio/text column), DataUnavailable.
    """

    def __init__(
        self, name: str, path: str | Path | None, split: str = "train", max_items: int | None = None
    ):
        self.name, self.split = name, split
        self.path = Path(path).expanduser() if path else None
        self.where = str(path or name)
        self.max_items = None if max_items is None else int(max_items)
        self.ds = self._open()
        names = list(self.ds.column_names or [])
        if not names:  # features unknown until a row is read (some hub formats)
            names = list(next(iter(self._rows(self.ds)), {}).keys())
        self.cols = HFColumns.of(names, self.where)
        if self.ds.features is not None:
            from datasets import Audio

            self.ds = self.ds.cast_column("audio", Audio(decode=False))

    def _open(self, columns: list[str] | None = None) -> Any:
        kwargs = {} if columns is None else {"columns": columns}
        if self.path is None:
            return load_hub(self.name, self.split, streaming=True, **kwargs)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset not found: data.path={self.path}")
        if is_saved_dataset(self.path):
            ds = load_saved(self.path, self.split)
            return (ds if columns is None else ds.select_columns(columns)).to_iterable_dataset()
        from datasets import load_dataset

        files = parquet_files(self.path, self.split)
        return load_dataset("parquet", data_files=files, split="train", streaming=True, **kwargs)

    def speakers(self) -> tuple[set[str], int] | None:
        """(speaker names, rows) from one pass over the speaker column alone; None without one."""
        column = self.cols.speaker
        if column is None:
            return None
        try:
            ds = self._open(columns=[column])
        except (DataUnavailable, TypeError, ValueError):  # not parquet: the whole stream, one column kept
            ds = self.ds.select_columns([column])
        names: set[str] = set()
        rows = 0
        for batch in self._guard(ds.iter(batch_size=_BATCH)):
            values = batch[column]
            if self.max_items is not None:
                values = values[: self.max_items - rows]
            names.update(str(v) for v in values if v is not None)
            rows += len(values)
            if self.max_items is not None and rows >= self.max_items:
                break
        return names, rows

    def __iter__(self) -> Iterator[RawItem]:
        cols = self.cols
        for n, row in enumerate(self._rows(self.ds)):
            audio = functools.partial(audio_of, row.get("audio"), f"{self.where} row {n}")
            item_id = str(row.get(cols.id)) if cols.id else None
            speaker = row.get(cols.speaker) if cols.speaker else None
            group = row.get(cols.group) if cols.group else None
            yield hf_item(n, item_id, row.get("text"), speaker, group, audio)

    def _rows(self, ds: Any) -> Iterator[dict]:
        rows = self._guard(iter(ds))
        for n, row in enumerate(rows):
            if self.max_items is not None and n >= self.max_items:
                return
            yield row

    def _guard(self, rows: Iterable) -> Iterator:
        """``rows`` with a failure of the stream (network, a corrupt file) as one DataUnavailable line."""
        it, n = iter(rows), 0
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except Exception as err:  # datasets and fsspec raise many types mid-stream
                reason = " ".join(str(err).split())[:200] or type(err).__name__
                raise DataUnavailable(
                    f"the stream of {self.where!r} failed after {n} rows ({type(err).__name__}: {reason}); "
                    "a rerun reads the stream again and reuses the codes already encoded"
                ) from err
            yield row
            n += 1
