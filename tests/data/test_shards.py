"""Shard store (``data.store=shards``): same codes as the npy cache, atomic shards, resume after a
kill, sliced (distributed) preparation equal to one run, and training batches read from the index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from testkit import same_result

import elise.data.shards as shards
from elise.codec import build_codec
from elise.data.datamodule import EliseDataModule
from elise.data.prepare import prepare
from elise.data.shards import ClipIndex, read_ipc
from elise.text import ByteTokenizer


class Interrupted(Exception):
    """Stands in for a kill while a shard is being written."""


def cfg(cache: Path, **kw: object) -> dict:
    return {"source": "sample", "cache_dir": str(cache), "store": "shards", "shard_mb": 0.005, **kw}


def run(c: dict, **kw: object):
    return prepare(c, build_codec("tiny", batch_size=4), ByteTokenizer(), progress=False, **kw)


def test_shards_hold_the_npy_cache_codes_in_bounded_files(tmp_path: Path) -> None:
    npy = run({"source": "sample", "cache_dir": str(tmp_path / "npy")})
    data = run(cfg(tmp_path / "sh"))
    same_result(npy, data)
    files = sorted((tmp_path / "sh" / "shards").glob("*.arrow"))
    assert len(files) >= 3 and not list((tmp_path / "sh").rglob("*.npy"))
    for f in files:  # a shard closes once 5 KiB of codes wait: at most one clip (< 8 KiB) over
        table = read_ipc(f)
        assert table.schema.names == ["key", "frames", "codes"]
        assert sum(len(c) for c in table.column("codes").to_pylist()) < 0.005 * 2**20 + 8192
    # the index: one row per kept clip, lengths and splits without touching the codes
    index = ClipIndex(data.index)
    assert len(index) == 16 and index.column("rows").tolist() == [e.num_rows for e in data.examples]
    assert index.column("val").sum() == 2 and index.meta["report"]["kept"] == 16
    again = run(cfg(tmp_path / "sh"))
    assert again.report["cached"] == 16 and again.report["encoded"] == 0
    assert sorted((tmp_path / "sh" / "shards").glob("*.arrow")) == files


def test_kill_while_writing_a_shard_leaves_no_partial_shard_and_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace, calls = shards.os.replace, []

    def killed_on_third(src, dst):  # the third shard's bytes are on disk under a temporary name
        calls.append(dst)
        if len(calls) == 3:
            raise Interrupted
        real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", killed_on_third)
    with pytest.raises(Interrupted):
        run(cfg(tmp_path))
    monkeypatch.undo()
    folder = tmp_path / "shards"
    assert len(list(folder.glob("*.arrow"))) == 2 and len(list(folder.glob(".*.tmp"))) == 1
    for f in folder.glob("*.arrow"):
        read_ipc(f)  # whole files only
    data = run(cfg(tmp_path))
    assert not list(folder.glob(".*.tmp"))  # the rerun removed the dead temporary file
    assert data.report["cached"] > 0 and data.report["cached"] + data.report["encoded"] == 16
    same_result(data, run(cfg(tmp_path / "clean")))


def test_two_slices_equal_one_run(tmp_path: Path) -> None:
    one = run(cfg(tmp_path / "one"), num_workers=0)
    first = run(cfg(tmp_path / "two"), shard=0, num_shards=2)
    assert first.examples == [] and first.report == {"slice": 0, "num_shards": 2}
    second = run(cfg(tmp_path / "two"), shard=1, num_shards=2)  # the last slice merges the parts
    same_result(one, second)
    writers = {p.name.split("-")[0] for p in (tmp_path / "two" / "shards").glob("*.arrow")}
    assert writers == {"s0of2", "s1of2"}
    assert ClipIndex(second.index).column("rows").tolist() == ClipIndex(one.index).column("rows").tolist()
    with pytest.raises(ValueError, match="prepare.shard"):
        run(cfg(tmp_path / "bad"), shard=2, num_shards=2)


def test_worker_processes_decode_the_same_clips(tmp_path: Path) -> None:
    same_result(run(cfg(tmp_path / "a")), run(cfg(tmp_path / "b"), num_workers=2))


def test_datamodule_trains_from_the_index_with_the_npy_batches(tmp_path: Path) -> None:
    def batches(store: str, workers: int) -> list[tuple]:
        data = {"source": "sample", "cache_dir": str(tmp_path / store), "store": store, "shard_mb": 0.005}
        dm = EliseDataModule(
            data | {"max_tokens": 400, "max_samples": 4, "num_workers": workers}, {"name": "tiny"}
        )
        dm.prepare_data()
        dm.setup("fit")
        return [(b["ids"], b["tokens"]) for b in dm.train_dataloader()], dm

    ref, _ = batches("npy", 0)
    got, dm = batches("shards", 1)  # a DataLoader worker reopens the index (it pickles as a path)
    assert [i for i, _ in got] == [i for i, _ in ref] and all(
        a.equal(b) for (_, a), (_, b) in zip(got, ref, strict=True)
    )
    assert isinstance(dm.train_set.lengths, np.ndarray) and dm.report["kept"] == 16
    assert json.loads(json.dumps(dm.report))["train"] == len(dm.train_set) == 14


def test_codes_of_reads_both_list_layouts() -> None:
    codes = np.arange(32 * 5, dtype=np.int16).reshape(32, 5)
    kt = pa.array([codes.tolist()])
    tk = pa.array([codes.T.tolist()])
    assert np.array_equal(shards.codes_of(kt[0], "kt"), codes)
    assert np.array_equal(shards.codes_of(tk[0], "tk"), codes)
    assert np.array_equal(shards.codes_of(pa.array([codes.tobytes()])[0], "bytes"), codes)


def test_shards_on_an_npy_cache_folder_convert_it_without_encoding(tmp_path: Path) -> None:
    npy = run({"source": "sample", "cache_dir": str(tmp_path)})
    data = run(cfg(tmp_path))
    assert data.report["encoded"] == 0 and data.report["cached"] == 16
    same_result(npy, data)
    assert all(e.row is not None for e in data.examples)  # read from the shards now


def test_list_codes_are_read_as_a_view_and_converted_once() -> None:
    codes = np.arange(32 * 5, dtype=np.int64).reshape(32, 5)
    for layout, cell in (("kt", pa.array([codes.tolist()])[0]), ("tk", pa.array([codes.T.tolist()])[0])):
        got = shards.codes_of(cell, layout)
        assert not got.flags.owndata and got.dtype == np.int64  # no int16 copy on the way to int64
        assert np.array_equal(got, codes)


def test_training_ranks_find_the_index_without_building_the_codec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import elise.codec

    data = cfg(tmp_path) | {"max_tokens": 400, "max_samples": 4}
    rank0 = EliseDataModule(data, {"name": "tiny"})
    rank0.prepare_data()  # Lightning: local rank 0 only
    rank0.setup("fit")

    def no_codec(*args: object, **kw: object):
        raise AssertionError("a rank built the codec")

    monkeypatch.setattr(elise.codec, "build_codec", no_codec)
    rank1 = EliseDataModule(data, {"name": "tiny"})
    rank1.setup("fit")
    assert rank1.train_set.positions.tolist() == rank0.train_set.positions.tolist()
    assert rank1.report == rank0.report and len(rank1.val_set) == 2
