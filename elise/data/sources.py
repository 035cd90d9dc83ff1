"""Data sources: each reads its metadata into a list of ``RawItem`` (id, text, speaker, audio).

Audio is not decoded here: an item holds a file path, or a loader that returns encoded bytes
(Hugging Face rows are read one at a time, so a large dataset is never held in memory).

- ``elise``: a Hugging Face dataset (default ``Jinsaryko/Elise``; columns audio, text, optional
  speaker) from the hub, or a local copy with ``data.path`` (parquet file(s)/folder or a
  ``save_to_disk`` folder); ``data.streaming=true`` reads it as a stream (``elise.data.stream``).
- ``ljspeech``: ``data.root`` with ``metadata.csv`` (``id|text``, ``id|speaker|text`` or LJSpeech's
  ``id|text|normalized_text``) and ``wavs/<id>.wav``.
- ``manifest``: a JSONL file (``audio``, ``text``, optional ``speaker`` / ``id`` / ``group``), ``data.path``.
- ``folder``: a folder of recordings, cut at pauses and transcribed into a manifest (``elise.data.folder``).
- ``sample``: the clips bundled in ``elise/assets/sample`` (read as ``ljspeech``; works offline).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_HF_NAME = "Jinsaryko/Elise"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
_SPEAKER_TOKEN = re.compile(r"^[\w.\-]{1,64}$")


class DataUnavailable(RuntimeError):
    """The dataset cannot be fetched (hub down, taken down, offline, no access)."""


@dataclass
class RawItem:
    """One clip as a source lists it, before decoding.

    ``audio`` is a file path or a zero-argument loader returning a path or encoded bytes.
    ``error`` is set (reason, detail) when the source itself found the entry malformed.
    ``group`` is the conversation/session the clip belongs to, when the source says.
    """

    id: str
    text: str
    speaker: str | None
    audio: Path | Callable[[], Path | bytes] | None
    error: tuple[str, str] | None = None
    group: str | None = None


class NamedBytes(bytes):
    """Encoded audio bytes that know where they came from (``name``), for error messages."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


def sample_root() -> Path:
    """Folder of the bundled sample set (metadata.csv + wavs/)."""
    return Path(__file__).resolve().parent.parent / "assets" / "sample"


def speaker_map(names: Iterable[str | None]) -> dict[str, int]:
    """Speaker name -> int id. Integer names keep their value; otherwise sorted names get 0, 1, ...

    Items without a speaker get 0 (``speaker_id``), so a one-speaker dataset is all speaker 0.
    """
    unique = sorted({n for n in names if n is not None})
    if unique and all(n.isdigit() for n in unique):
        return {n: int(n) for n in unique}
    return {n: i for i, n in enumerate(unique)}


def speaker_id(name: str | None, mapping: Mapping[str, int]) -> int:
    return 0 if name is None else mapping[name]


def read_ljspeech(root: str | Path, speaker_column: bool | str = "auto") -> list[RawItem]:
    """``root/metadata.csv`` lines + ``root/wavs/<id>.<wav|flac|ogg|mp3>``.

    With 3 columns, ``speaker_column`` says whether the 2nd is a speaker (``true``) or the text with
    the 3rd its normalized form (``false``, LJSpeech's own layout; the normalized text is used);
    ``auto`` treats it as a speaker when every 2nd column is a single token (no spaces).
    """
    root = Path(root).expanduser()
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"no metadata.csv in data.root={root}")
    # surrogateescape: an undecodable line becomes an untokenizable item, not a crash of the file
    lines = meta.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    rows = [line.split("|") for line in lines if line.strip()]
    use_speaker = _speaker_column(rows, speaker_column)
    items = []
    for n, cols in enumerate(rows, start=1):
        item_id = cols[0].strip()
        if len(cols) < 2 or not item_id:
            items.append(RawItem(item_id or f"line{n}", "", None, None, ("bad_metadata", f"line {n}")))
            continue
        speaker = None
        if len(cols) >= 3 and use_speaker:
            speaker, text = cols[1].strip() or None, "|".join(cols[2:])
        elif len(cols) >= 3:
            text = cols[2] if cols[2].strip() else cols[1]
        else:
            text = cols[1]
        items.append(RawItem(item_id, text.strip(), speaker, _find_audio(root / "wavs", item_id)))
    return items


def _speaker_column(rows: list[list[str]], option: bool | str) -> bool:
    if isinstance(option, bool):
        return option
    option = str(option).lower()
    if option in ("true", "false"):
        return option == "true"
    if option != "auto":
        raise ValueError(f"data.speaker_column must be auto, true or false, got {option!r}")
    three = [cols for cols in rows if len(cols) >= 3]
    return bool(three) and all(_SPEAKER_TOKEN.match(cols[1].strip()) for cols in three)


def _find_audio(folder: Path, item_id: str) -> Path:
    for suffix in AUDIO_SUFFIXES:
        path = folder / f"{item_id}{suffix}"
        if path.is_file():
            return path
    return folder / f"{item_id}.wav"  # reported as missing_file


# --- JSONL manifest -----------------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[RawItem]:
    """JSONL lines ``{"audio": path, "text": ..., "speaker"?: ..., "id"?: ..., "group"?: ...}``.

    Relative audio paths are relative to the manifest's folder. The id defaults to the audio path
    without its suffix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: data.path={path}")
    items = []
    lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("audio"), str):
                raise ValueError("needs a string 'audio' field")
        except ValueError as err:
            items.append(RawItem(f"line{n}", "", None, None, ("bad_metadata", f"line {n}: {err}")))
            continue
        audio = Path(row["audio"]).expanduser()
        item_id = str(row.get("id") or Path(row["audio"]).with_suffix("").as_posix())
        speaker = None if row.get("speaker") is None else str(row["speaker"])
        text = row.get("text")
        text = text.strip() if isinstance(text, str) else ""
        group = None if row.get("group") is None else str(row["group"])
        audio = audio if audio.is_absolute() else path.parent / audio
        items.append(RawItem(item_id, text, speaker, audio, group=group))
    return items


# --- Hugging Face datasets ----------------------------------------------------------------------


def read_hf(name: str, path: str | Path | None = None, split: str = "train") -> list[RawItem]:
    """A Hugging Face dataset with columns audio, text and optional speaker/speaker_name/id and
    group/conversation_id.

    ``path`` (a parquet file, a folder of parquet files or a ``save_to_disk`` folder) is read
    instead of the hub. The audio column is cast to ``Audio(decode=False)`` and decoded by
    ``elise.data.audio`` from its bytes (or its path when a row has no bytes).
    ``elise.data.stream`` reads the same rows as a stream (``data.streaming=true``).
    """
    from datasets import Audio

    ds = _load_local(Path(path).expanduser(), split) if path else load_hub(name, split)
    cols = HFColumns.of(ds.column_names, str(path or name))
    ds = ds.cast_column("audio", Audio(decode=False))
    texts = ds["text"]
    speakers = ds[cols.speaker] if cols.speaker else [None] * len(ds)
    groups = ds[cols.group] if cols.group else [None] * len(ds)
    ids = [str(i) for i in ds["id"]] if cols.id else [None] * len(ds)
    audio_col = ds.select_columns(["audio"])
    where = str(path or name)
    return [
        hf_item(i, ids[i], texts[i], speakers[i], groups[i], _row_loader(audio_col, i, f"{where} row {i}"))
        for i in range(len(ds))
    ]


@dataclass(frozen=True)
class HFColumns:
    """The columns of a Hugging Face audio dataset that elise reads (None: the dataset has none)."""

    speaker: str | None
    group: str | None
    id: str | None

    @classmethod
    def of(cls, names: list[str], where: str) -> HFColumns:
        """Raises ValueError when the audio or text column is missing."""
        missing = {"audio", "text"} - set(names)
        if missing:
            raise ValueError(f"dataset {where} lacks column(s) {sorted(missing)}; has {names}")
        speaker = next((c for c in ("speaker", "speaker_name", "speaker_id") if c in names), None)
        group = next((c for c in ("group", "conversation_id", "session") if c in names), None)
        return cls(speaker, group, "id" if "id" in names else None)


def hf_item(
    n: int, item_id: str | None, text: Any, speaker: Any, group: Any, audio: Callable[[], Path | bytes]
) -> RawItem:
    """Row ``n`` of a Hugging Face dataset as an item (``item_id`` None: the row number)."""
    return RawItem(
        f"{n:06d}" if item_id is None else item_id,
        text.strip() if isinstance(text, str) else "",
        None if speaker is None else str(speaker),
        audio,
        group=None if group is None else str(group),
    )


def audio_of(cell: Any, where: str) -> Path | bytes:
    """Encoded audio of an ``Audio(decode=False)`` cell: its bytes (named by ``where`` and the file
    name it was stored from) or its path. Raises ValueError when it has neither."""
    cell = cell or {}
    if cell.get("bytes"):
        return NamedBytes(cell["bytes"], f"{where} ({cell['path']})" if cell.get("path") else where)
    if cell.get("path"):
        return Path(cell["path"])
    raise ValueError("row has neither audio bytes nor an audio path")


def _row_loader(ds: Any, index: int, where: str) -> Callable[[], Path | bytes]:
    return lambda: audio_of(ds[index]["audio"], where)


def hub_unavailable(name: str, err: Exception) -> DataUnavailable:
    """The one-line error of a hub dataset that cannot be read (with what to use instead)."""
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return DataUnavailable(
        f"cannot load dataset {name!r} from the Hugging Face hub ({type(err).__name__}: {reason}); "
        "the public copies of Elise were taken down in 2026 (hub 401, DMCA): point data.path= at a "
        "local copy (parquet or save_to_disk), or use data=ljspeech data.root=<folder> "
        "(e.g. keithito/lj_speech) or data=manifest data.path=<file.jsonl>; HF_HUB_OFFLINE=1 uses a copy "
        "already in the datasets cache"
    )


def load_hub(name: str, split: str, streaming: bool = False, **kwargs: Any) -> Any:
    """``datasets.load_dataset(name, split=split, streaming=streaming)``; DataUnavailable on failure."""
    from datasets import load_dataset

    from elise import hub

    try:
        if not hub.offline():
            hub.check(name, "dataset")  # unreachable or taken down (401/404): fails here, not after retries
        return load_dataset(name, split=split, streaming=streaming, **kwargs)
    except Exception as err:  # hub errors come as many types (HTTP, gated, not found, offline)
        raise hub_unavailable(name, err) from err


def is_saved_dataset(path: Path) -> bool:
    """A ``save_to_disk`` folder (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def load_saved(path: Path, split: str) -> Any:
    """The ``split`` of a ``save_to_disk`` folder (a DatasetDict's split, or the Dataset itself)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"split {split!r} not in {path} (has {sorted(ds)})")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    return ds


def parquet_files(path: Path, split: str) -> list[str]:
    """The parquet file(s) of ``data.path`` for ``split``, in order (a clone of a hub repo holds e.g.
    data/train-0000.parquet and data/test-0000.parquet: the names holding the split, else all)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files or save_to_disk dataset in data.path={path}")
    in_split = [f for f in files if split in f.name]
    return [str(f) for f in in_split or files]


def _load_local(path: Path, split: str) -> Any:
    from datasets import load_dataset

    if not path.exists():
        raise FileNotFoundError(f"dataset not found: data.path={path}")
    if is_saved_dataset(path):
        return load_saved(path, split)
    return load_dataset("parquet", data_files=parquet_files(path, split), split="train")
