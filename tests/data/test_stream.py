"""``data.streaming=true``: an audio dataset prepared from the stream (a local parquet folder read with
``load_dataset(..., streaming=True)``) gives what a full read gives: ids, codes, speakers, splits,
report; with slices, the shard store, a worker process, a kill and a hub that fails."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from testkit import same_result, tone

import elise.data.prepare as prep
from elise.codec import build_codec
from elise.data.load import list_items
from elise.data.prepare import prepare
from elise.data.sources import DataUnavailable
from elise.data.stream import HFStream
from elise.text import ByteTokenizer

SPEAKERS = ["carol", "alice", "bob"]


def wav_bytes(i: int, seconds: float = 0.6, sr: int = 16_000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, sr, freq=200.0 + 37 * i), sr, format="WAV")
    return buf.getvalue()


def rows(n: int, ids: bool) -> dict[str, list]:
    """``n`` clips of three speakers; row 3 unreadable, row 5 without text, row 7 without audio,
    and (with ids) row 9 repeats row 8's id."""
    audio: list = [
        {"bytes": wav_bytes(i, sr=16_000 if i % 2 else 22_050), "path": f"c{i}.wav"} for i in range(n)
    ]
    if n > 7:
        audio[3] = {"bytes": b"not audio at all" * 8, "path": "c3.wav"}
        audio[7] = None
    out = {
        "audio": audio,
        "text": [f"Clip number {i}." if i != 5 else "   " for i in range(n)],
        "speaker_name": [SPEAKERS[i % 3] for i in range(n)],
    }
    if ids:
        out["id"] = [f"clip{i:02d}" if i != 9 else "clip08" for i in range(n)]
    return out


def parquet_folder(root: Path, n: int = 14, ids: bool = False) -> Path:
    """The rows in two parquet files (row order: file 0, then file 1)."""
    root.mkdir(parents=True)
    table = pa.table(rows(n, ids))
    pq.write_table(table.slice(0, n // 2), root / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(table.slice(n // 2), root / "train-00001-of-00002.parquet", row_group_size=3)
    return root


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def cfg(path: Path, cache: Path, **kw: object) -> dict:
    return {"source": "elise", "path": str(path), "cache_dir": str(cache), "val_fraction": 0.3, **kw}


def run(c: dict, **kw: object):
    return prepare(c, build_codec("tiny", batch_size=4), ByteTokenizer(), progress=False, **kw)


@pytest.mark.parametrize("ids", [False, True])
def test_streaming_prepares_what_a_full_read_prepares(tmp_path: Path, ids: bool) -> None:
    data = parquet_folder(tmp_path / "pq", ids=ids)
    full = run(cfg(data, tmp_path / "full"))
    streamed = run(cfg(data, tmp_path / "streamed", streaming=True))
    same_result(full, streamed)
    assert streamed.report["encoded"] == full.report["encoded"] == len(full.examples)
    skipped = {s["reason"] for s in full.report["items"]}
    assert skipped == {"unreadable_audio", "empty_text"} | ({"duplicate_id"} if ids else set())
    assert full.report["speakers"] == {"alice": 0, "bob": 1, "carol": 2}
    assert {e.split for e in full.examples} == {"train", "val"}
    assert [e.id for e in streamed.examples][:3] == (
        ["clip00", "clip01", "clip02"] if ids else ["000000", "000001", "000002"]
    )


def test_streaming_slices_shards_and_a_worker_equal_one_full_run(tmp_path: Path) -> None:
    data = parquet_folder(tmp_path / "pq", ids=True)
    full = run(cfg(data, tmp_path / "full", store="shards", shard_mb=0.005))
    c = cfg(data, tmp_path / "sliced", store="shards", shard_mb=0.005, streaming=True)
    first = run(c, shard=1, num_shards=2, num_workers=1)
    assert first.examples == [] and first.report == {"slice": 1, "num_shards": 2}
    second = run(c, shard=0, num_shards=2)
    # row 9 repeats row 8's id from the other slice: that slice encodes it before the merge drops it
    same_result(full, second, counts=False)
    assert second.index is not None and second.report["encoded"] == len(full.examples) + 1


def test_streaming_max_items_and_speakers_from_the_speaker_column_alone(tmp_path: Path) -> None:
    data = parquet_folder(tmp_path / "pq")
    listing = list_items(cfg(data, tmp_path / "c", streaming=True, max_items=2))
    assert listing.total == 2 and listing.speakers == {"alice": 0, "carol": 1}
    assert [it.id for it in listing.items] == ["000000", "000001"]
    same_result(
        run(cfg(data, tmp_path / "a", max_items=8)),
        run(cfg(data, tmp_path / "b", max_items=8, streaming=True)),
    )
    # no speaker column: no first pass, a total nobody knows, every clip speaker 0
    pq.write_table(
        pa.table({k: v for k, v in rows(4, False).items() if k != "speaker_name"}), tmp_path / "one.parquet"
    )
    c = cfg(tmp_path / "one.parquet", tmp_path / "c", streaming=True)
    listing = list_items(c)
    assert listing.total is None and listing.speakers == {}
    data_ = prepare(c, build_codec("tiny"), ByteTokenizer(), progress=True)  # a bar without a total
    assert data_.report["kept"] == 4 and {e.speaker for e in data_.examples} == {0}


def test_stream_is_read_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first codec batch is encoded before the stream has given more than one chunk of rows."""
    monkeypatch.setattr(prep, "ENCODE_WINDOW", 1)  # chunks of 4 rows (batch_size 4)
    data = parquet_folder(tmp_path / "pq", n=20)
    read: list[int] = []
    real_iter = HFStream.__iter__

    def counting(self):
        for n, item in enumerate(real_iter(self)):
            read.append(n)
            yield item

    monkeypatch.setattr(HFStream, "__iter__", counting)
    codec = build_codec("tiny", batch_size=4)
    at_encode: list[int] = []
    real_encode = codec.encode

    def encode(wav: torch.Tensor, lengths: torch.Tensor | None = None):
        at_encode.append(len(read))
        return real_encode(wav, lengths)

    monkeypatch.setattr(codec, "encode", encode)
    data_ = prepare(cfg(data, tmp_path / "c", streaming=True), codec, ByteTokenizer(), progress=True)
    assert len(read) == 20 and at_encode[0] <= 8 and len(data_.examples) == 17


def test_killed_streaming_run_reruns_and_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = parquet_folder(tmp_path / "pq")
    c = cfg(data, tmp_path / "c", streaming=True)
    codec = build_codec("tiny", batch_size=4)
    real_encode, calls = codec.encode, []

    def dies_on_second(wav: torch.Tensor, lengths: torch.Tensor | None = None):
        calls.append(wav.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(wav, lengths)

    monkeypatch.setattr(codec, "encode", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(c, codec, ByteTokenizer(), progress=False)
    again = run(c)
    assert again.report["cached"] == calls[0] == 4 and again.report["encoded"] == len(again.examples) - 4
    same_result(run(cfg(data, tmp_path / "full")), again)


def test_streaming_hub_path_and_its_failures_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    data = parquet_folder(tmp_path / "pq")
    full = run(cfg(data, tmp_path / "full"))
    files = sorted(str(f) for f in data.glob("*.parquet"))
    calls: list[tuple] = []
    real = datasets.load_dataset

    def hub(name: str, **kw: object):  # the hub dataset: these parquet files
        calls.append((name, kw))
        return real("parquet", data_files=files, **{**kw, "split": "train"})

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", hub)
    c = {"source": "elise", "name": "someone/voices", "cache_dir": str(tmp_path / "c"), "val_fraction": 0.3}
    hub = run(c | {"streaming": True})  # skip details name the hub id instead of the folder
    assert [(e.id, e.split, e.speaker, e.frames) for e in hub.examples] == [
        (e.id, e.split, e.speaker, e.frames) for e in full.examples
    ]
    assert (
        hub.report["skipped"] == full.report["skipped"]
        and "someone/voices row 3" in hub.report["items"][0]["detail"]
    )
    assert calls[0] == ("someone/voices", {"split": "train", "streaming": True})
    assert calls[1] == ("someone/voices", {"split": "train", "streaming": True, "columns": ["speaker_name"]})

    def offline(*args: object, **kw: object):
        raise ConnectionError("Couldn't reach 'someone/voices' on the Hub (LocalEntryNotFoundError)\nretry")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataUnavailable) as err:
        run(c | {"streaming": True})
    assert "\n" not in str(err.value) and "someone/voices" in str(err.value)
    with pytest.raises(ValueError, match="data.streaming"):
        run({"source": "sample", "cache_dir": str(tmp_path / "s"), "streaming": True})


def test_a_stream_that_breaks_midway_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = parquet_folder(tmp_path / "pq")
    stream = HFStream("unused", data)
    real = iter(stream.ds)

    class Broken:
        def __iter__(self):
            yield next(real)
            raise OSError("connection reset by peer\nat byte 1234")

    stream.ds = Broken()
    with pytest.raises(DataUnavailable, match="failed after 1 rows") as err:
        list(stream)
    assert "\n" not in str(err.value)


def test_a_finished_streamed_shard_store_is_not_streamed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from elise.data.datamodule import EliseDataModule
    from elise.data.shards import ClipIndex

    data = parquet_folder(tmp_path / "pq")
    c = cfg(data, tmp_path / "c", streaming=True, store="shards")
    first = run(c)

    def no_stream(*args: object, **kw: object):
        raise AssertionError("the stream was read again")

    monkeypatch.setattr(datasets, "load_dataset", no_stream)
    again = run(c)
    assert again.index == first.index and again.report == first.report and again.examples == []
    dm = EliseDataModule(c | {"max_tokens": 400, "max_samples": 4}, {"name": "tiny"})
    dm.prepare_data()  # training on the prepared stream
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == len(ClipIndex(first.index)) == len(first.examples)


def test_training_on_a_stream_in_the_npy_store_streams_it_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare_data's result is reused by setup in the same process (it streamed twice); a further rank
    with the npy store, which keeps no index, would stream everything again: a one-line ValueError."""
    from types import SimpleNamespace

    import datasets

    from elise.data.datamodule import EliseDataModule

    data = parquet_folder(tmp_path / "pq")
    c = cfg(data, tmp_path / "c", streaming=True) | {"max_tokens": 400, "max_samples": 4}
    opened = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: opened.append(kw) or real(*a, **kw))
    dm = EliseDataModule(c, {"name": "tiny"})
    dm.prepare_data()
    streams = len(opened)
    dm.setup("fit")
    assert len(opened) == streams and len(dm.train_set) + len(dm.val_set) > 0
    other = EliseDataModule(c, {"name": "tiny"})
    other.trainer = SimpleNamespace(world_size=2, global_rank=1)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="needs data.store=shards"):
        other.setup("fit")
