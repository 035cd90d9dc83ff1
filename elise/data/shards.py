"""Sharded code store for large datasets: Arrow IPC shards of codes, and the clip index over them.

Shards (``<cache_dir>/shards/<writer>-<seq>.arrow``): rows ``key`` (the content key of
``elise.data.cache.CodeCache.key``: decoded audio + codec + settings), ``frames`` and ``codes``
(int16 [32, frames] C-order bytes). A shard is written when ``shard_mb`` of codes are waiting (or at
the end), to a temporary name then renamed, so a kill leaves whole shards or none: the keys in the
finished shards are the only resume state. Each writer (one per prepare slice) has its own prefix.

Index (``<cache_dir>/index-<name>.arrow`` + ``.json``): one row per kept clip: id, text, speaker, group, val,
text_ids, frames, rows (text + audio + EOS rows, what the batch sampler budgets), seconds, source,
and where its codes are (``file``: a number into the index's file list, ``row``). The index and the
shards are memory-mapped: opening them reads nothing but the columns a caller touches, so a
training run holds the length column, not the codes.

Codes columns read: ``codes`` as int16 bytes [32, T] (our shards), or nested integer lists of
shape [32, T] or [T, 32] (pre-tokenized hub datasets; ``layout`` "kt" / "tk").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from elise.data.cache import CodeCache
from elise.layout import NUM_CODEBOOKS

SHARD_SCHEMA = pa.schema([("key", pa.string()), ("frames", pa.int32()), ("codes", pa.binary())])


def write_ipc(path: Path, table: pa.Table) -> None:
    """Write ``table`` as one Arrow IPC file, atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_ipc(path: str | Path) -> pa.Table:
    """A memory-mapped Arrow IPC file (file or stream format, as ``datasets`` writes) as a table;
    zero-copy: pages are read when touched."""
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


class ShardStore(CodeCache):
    """``CodeCache`` whose codes live in Arrow shards of about ``shard_mb`` MB.

    ``save`` buffers; ``close`` writes the last shard. Codes already in the npy cache of the same
    folder count as stored (they are copied in, not encoded again). ``location(key)`` is (shard path, row) once
    the key's shard is written. Keys already in any writer's shards are hits (``frames``).
    """

    def __init__(
        self,
        root: str | Path,
        codec_identity: str,
        settings: str = "",
        writer: str = "w0",
        shard_mb: float = 256.0,
    ):
        super().__init__(root, codec_identity, settings)
        self.dir = self.root / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer, self.shard_bytes = writer, max(1, int(float(shard_mb) * 2**20))
        for tmp in self.dir.glob(f".{writer}-*.tmp"):  # left by a kill of this writer
            tmp.unlink(missing_ok=True)
        self.where: dict[str, tuple[str, int, int]] = {}  # key -> (shard name, row, frames)
        self._seq = 0
        for path in sorted(self.dir.glob("*.arrow")):
            self._add_shard(path)
            if path.name.startswith(f"{writer}-"):
                self._seq = max(self._seq, int(path.stem.rsplit("-", 1)[1]) + 1)
        self._pending: list[tuple[str, np.ndarray]] = []
        self._pending_frames: dict[str, int] = {}
        self._pending_bytes = 0

    def _add_shard(self, path: Path) -> None:
        try:
            table = read_ipc(path).select(["key", "frames"])
        except (OSError, pa.ArrowInvalid):
            return  # not a shard of ours: ignored (its clips are encoded again)
        for row, (key, frames) in enumerate(
            zip(table.column("key").to_pylist(), table.column("frames").to_pylist(), strict=True)
        ):
            self.where.setdefault(key, (path.name, row, int(frames)))

    def frames(self, key: str, num_codebooks: int) -> int | None:
        """Frames of a stored key; a key only in the per-clip npy cache of the same folder is copied
        into the shards (so ``data.store=shards`` converts an npy cache without encoding again)."""
        if key in self.where:
            return self.where[key][2]
        if key not in self._pending_frames and super().frames(key, num_codebooks) is not None:
            self.save(key, np.load(self.path(key)))
        return self._pending_frames.get(key)

    def save(self, key: str, codes: np.ndarray) -> Path:
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
            raise ValueError(f"codes out of int16 range: [{codes.min()}, {codes.max()}]")
        codes = np.ascontiguousarray(codes, dtype=np.int16)
        self._pending.append((key, codes))
        self._pending_frames[key] = int(codes.shape[1])
        self._pending_bytes += codes.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self.flush()
        return self.dir

    def flush(self) -> None:
        """Write the waiting codes as one shard."""
        if not self._pending:
            return
        keys = [k for k, _ in self._pending]
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "frames": pa.array([c.shape[1] for _, c in self._pending], pa.int32()),
                "codes": pa.array([c.tobytes() for _, c in self._pending], pa.binary()),
            },
            schema=SHARD_SCHEMA,
        )
        name = f"{self.writer}-{self._seq:06d}.arrow"
        write_ipc(self.dir / name, table)
        self._seq += 1
        for row, (key, codes) in enumerate(self._pending):
            self.where.setdefault(key, (name, row, int(codes.shape[1])))
        self._pending, self._pending_frames, self._pending_bytes = [], {}, 0

    close = flush

    def location(self, key: str) -> tuple[str, int]:
        name, row, _ = self.where[key]
        return str(self.dir / name), row


# ---- reading ---------------------------------------------------------------------------------

_OPEN: dict[str, pa.Table] = {}  # per process: shard path -> memory-mapped table


def _table(path: str) -> pa.Table:
    table = _OPEN.get(path)
    if table is None:
        table = _OPEN[path] = read_ipc(path)
    return table


def codes_of(cell: Any, layout: str = "bytes") -> np.ndarray:
    """Codes [32, T] of one cell of a codes column (a pyarrow scalar): int16 for bytes, the lists'
    integer type for lists; a read-only view of the cell's buffer, not a copy (the caller converts once)."""
    if layout == "bytes":
        flat = np.frombuffer(cell.as_buffer(), dtype=np.int16)
        return flat.reshape(NUM_CODEBOOKS, -1)
    outer = cell.values  # ListArray: [32] lists of T ("kt") or [T] lists of 32 ("tk")
    flat = outer.flatten().to_numpy(zero_copy_only=False)
    if layout == "kt":
        return flat.reshape(len(outer), -1)[:NUM_CODEBOOKS]
    return flat.reshape(len(outer), -1).T[:NUM_CODEBOOKS]


def read_codes(path: str, row: int, column: str = "codes", layout: str = "bytes") -> np.ndarray:
    """Codes [32, T] of ``row`` of the shard (or pre-encoded Arrow file) at ``path`` (``codes_of``)."""
    col = _table(path).column(column)
    return codes_of(col[row], layout)


# ---- the index -------------------------------------------------------------------------------

INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("speaker", pa.int32()),
        ("group", pa.string()),
        ("val", pa.bool_()),
        ("text_ids", pa.list_(pa.int32())),
        ("frames", pa.int32()),
        ("rows", pa.int32()),
        ("seconds", pa.float32()),
        ("source", pa.string()),
        ("file", pa.int32()),
        ("row", pa.int64()),
    ]
)


def index_batch(records: Sequence[dict]) -> pa.RecordBatch:
    """Index rows from records holding the INDEX_SCHEMA fields except ``rows``."""
    cols = {f.name: [r.get(f.name) for r in records] for f in INDEX_SCHEMA if f.name != "rows"}
    cols["rows"] = [len(r["text_ids"]) + int(r["frames"]) + 1 for r in records]
    return pa.RecordBatch.from_pydict(cols, schema=INDEX_SCHEMA)


def write_index(path: Path, batches: Iterable[pa.RecordBatch], meta: dict | Callable[[], dict]) -> None:
    """Write a clip index: the rows (streamed batch by batch, atomically) then ``<path>.json``
    (``meta``, or a function called after the batches: ``files`` (paths relative to the index's folder, or absolute), ``column``,
    ``layout``, ``report``), whose presence says the index is whole."""
    side = path.with_suffix(".json")
    side.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
    os.replace(tmp, path)
    info = {"column": "codes", "layout": "bytes", **(meta() if callable(meta) else meta)}
    tmp_side = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp_side.write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp_side, side)


class ClipIndex:
    """A memory-mapped index file: column arrays on demand, one clip's fields by position.

    Pickles as its path (DataLoader workers reopen the file, they never copy the table).
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._table: pa.Table | None = None

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = read_ipc(self.path)
            self._meta = json.loads(Path(self.path).with_suffix(".json").read_text(encoding="utf-8"))
            base = Path(self.path).parent
            self._files = [str(base / f) if not os.path.isabs(f) else f for f in self._meta["files"]]
        return self._table

    @property
    def meta(self) -> dict:
        _ = self.table
        return self._meta

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def clip(self, j: int) -> dict:
        """id, text, speaker, group, val, text_ids, frames, seconds, source, codes_path, row of clip ``j``."""
        t = self.table
        out = {
            name: t.column(name)[j].as_py() for name in ("id", "text", "speaker", "group", "frames", "row")
        }
        out["text_ids"] = t.column("text_ids")[j].values.to_numpy().tolist()
        out["codes_path"] = self._files[int(t.column("file")[j].as_py())]
        return out

    def __getstate__(self) -> dict:
        return {"path": self.path, "_table": None}
