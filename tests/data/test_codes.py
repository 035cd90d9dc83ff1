"""Pre-encoded data (``data=codes``): Arrow folders read in place ([32, T] / [T, 32] lists, int16
bytes), Parquet and save_to_disk through ``datasets``, streaming, and training batches from the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elise.data.codes import examples_of, prepare_codes
from elise.data.datamodule import EliseDataModule
from elise.data.shards import ClipIndex, write_ipc
from elise.text import ByteTokenizer, encode_prompt


def clips(n: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = int(rng.integers(8, 40))
        out.append(
            {"id": f"c{i:03d}", "text": f"clip number {i}", "speaker": "ab"[i % 2],
             "codes": rng.integers(0, 2048, (32, frames)).astype(np.int16)}
        )  # fmt: skip
    out[3]["text"] = "  "  # empty_text
    out[5]["codes"] = out[5]["codes"][:, :3]  # 0.24 s: too_short
    return out


def table(rows: list[dict], layout: str) -> pa.Table:
    def cell(c: np.ndarray):
        return c.tobytes() if layout == "bytes" else (c.tolist() if layout == "kt" else c.T.tolist())

    return pa.Table.from_pylist([{**r, "codes": cell(r["codes"])} for r in rows])


def cfg(path: Path, cache: Path, **kw: object) -> dict:
    return {"source": "codes", "path": str(path), "cache_dir": str(cache), "val_count": 2, **kw}


@pytest.mark.parametrize("layout", ["kt", "tk", "bytes"])
def test_arrow_folder_is_indexed_in_place_in_every_layout(tmp_path: Path, layout: str) -> None:
    rows = clips()
    write_ipc(tmp_path / "src" / "a.arrow", table(rows[:7], layout)) if (
        tmp_path / "src"
    ).mkdir() is None else None
    write_ipc(tmp_path / "src" / "b.arrow", table(rows[7:], layout))
    data = prepare_codes(cfg(tmp_path / "src", tmp_path / "cache"), ByteTokenizer(), progress=False)
    report = data.report
    assert (report["total"], report["kept"], report["train"], report["val"]) == (12, 10, 8, 2)
    assert report["skipped"]["empty_text"] == 1 and report["skipped"]["too_short"] == 1
    assert report["layout"] == layout and report["speakers"] == {"a": 0, "b": 1}
    by_id = {r["id"]: r for r in rows}
    examples = examples_of(data.index)
    assert sorted(e.id for e in examples) == sorted(set(by_id) - {"c003", "c005"})
    for e in examples:
        assert np.array_equal(e.load_codes().numpy(), by_id[e.id]["codes"])
        assert (
            e.text_ids == encode_prompt(ByteTokenizer(), e.text, e.speaker)
            and e.frames == by_id[e.id]["codes"].shape[1]
        )
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing copied: rows are read in place
    stamp = data.index.stat().st_mtime_ns
    again = prepare_codes(cfg(tmp_path / "src", tmp_path / "cache"), ByteTokenizer(), progress=False)
    assert again.index.stat().st_mtime_ns == stamp and again.report == report  # unchanged files: reused
    write_ipc(tmp_path / "src" / "b.arrow", table(rows[7:9], layout))
    changed = prepare_codes(cfg(tmp_path / "src", tmp_path / "cache"), ByteTokenizer(), progress=False)
    assert changed.report["total"] == 9


def test_parquet_save_to_disk_and_streaming_sources(tmp_path: Path) -> None:
    rows = clips(seed=1)
    (tmp_path / "pq").mkdir()
    pq.write_table(table(rows, "tk"), tmp_path / "pq" / "train-0000.parquet")
    ref = {
        e.id: e.load_codes().numpy()
        for e in examples_of(
            prepare_codes(cfg(tmp_path / "pq", tmp_path / "c1"), ByteTokenizer(), progress=False).index
        )
    }
    from datasets import load_dataset

    load_dataset("parquet", data_files=str(tmp_path / "pq" / "*.parquet"), split="train").save_to_disk(
        tmp_path / "disk"
    )
    streamed = prepare_codes(
        cfg(tmp_path / "pq", tmp_path / "c3", streaming=True, shard_mb=0.01), ByteTokenizer(), progress=False
    )
    assert len(list((tmp_path / "c3").glob("streamed-*/part-*.arrow"))) >= 2  # written as they came
    for data in (
        prepare_codes(cfg(tmp_path / "disk", tmp_path / "c2"), ByteTokenizer(), progress=False),
        streamed,
    ):
        got = {e.id: e.load_codes().numpy() for e in examples_of(data.index)}
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    # a clone of a hub repo: data.split picks its files, as it does for audio sources (sources.parquet_files)
    pq.write_table(table(clips(n=7, seed=2), "tk"), tmp_path / "pq" / "test-0000.parquet")
    for split, n in (("train", len(rows)), ("test", 7)):
        for streaming in (False, True):
            c = cfg(tmp_path / "pq", tmp_path / f"s-{split}-{streaming}", split=split, streaming=streaming)
            assert prepare_codes(c, ByteTokenizer(), progress=False).report["total"] == n


def test_bad_codes_columns_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    write_ipc(tmp_path / "src" / "a.arrow", pa.table({"text": ["hi"], "codes": [[[1, 2]] * 8]}))
    with pytest.raises(ValueError, match=r"neither \[32, T\] nor \[T, 32\]"):
        prepare_codes(cfg(tmp_path / "src", tmp_path / "c"), ByteTokenizer(), progress=False)
    write_ipc(tmp_path / "src" / "a.arrow", pa.table({"text": ["hi"], "tokens": [b"\0\0" * 32]}))
    with pytest.raises(ValueError, match="no codes column"):
        prepare_codes(cfg(tmp_path / "src", tmp_path / "c"), ByteTokenizer(), progress=False)
    with pytest.raises(ValueError, match="data.path"):
        prepare_codes({"source": "codes", "cache_dir": str(tmp_path)}, ByteTokenizer(), progress=False)


def test_datamodule_trains_from_pre_encoded_codes_without_a_codec(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    rows = clips(40, seed=2)
    write_ipc(tmp_path / "src" / "a.arrow", table(rows, "kt"))
    data = cfg(tmp_path / "src", tmp_path / "cache", max_tokens=300, max_samples=4, num_workers=0)
    dm = EliseDataModule(data, {"name": "no-such-codec"})  # never built
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 36 and len(dm.val_set) == 2 and dm.report["kept"] == 38
    index = ClipIndex(dm.index_file)
    seen = []
    for batch in dm.train_dataloader():
        seen += batch["ids"]
        assert batch["tokens"].shape[0] * batch["tokens"].shape[1] <= 300
    assert sorted(seen) == sorted(e.id for e in dm.train_set.examples) and len(index) == 38


def test_bench_synthetic_set_is_indexed_and_rows_report_it(tmp_path: Path) -> None:
    from elise.bench.data import data_rows, synthetic_codes

    src = synthetic_codes(tmp_path / "syn", 3000, per_file=1000)
    assert len(list(src.glob("*.arrow"))) == 3
    data = prepare_codes(
        cfg(src, tmp_path / "cache", val_count=None, val_fraction=0.01), ByteTokenizer(), progress=False
    )
    index = ClipIndex(data.index)
    frames = index.column("frames")
    assert data.report["kept"] == len(index) == 3000 and frames.min() >= 12 and frames.max() <= 250
    assert 0 < data.report["val"] < 100 and len(data.report["speakers"]) > 400
    assert synthetic_codes(tmp_path / "syn", 3000, per_file=1000) == src  # kept, not generated again
    fig = {"index_s": 1.0, "sampler_s": 2.0, "epoch_plan_s": 3.0, "first_batch_s": 4.0, "peak_rss_mb": 5.0}
    rows = data_rows({"encode": {"codec": "x", "batched": {"audio_s_per_s": 1, "s": 1}, "one_by_one": {"audio_s_per_s": 1, "s": 1}},
                      "prepare": {"skipped": "-"}, "throughput": {"clips": 8, "tiny/2": {"s": 2.0, "clips_per_s": 4.0},
                                     "tiny/0/stream": {"s": 1.0, "clips_per_s": 8.0}},
                      "startup": {"clips": 3000, "cold": fig}})  # fmt: skip
    assert rows[2]["clips/s"] == 4.0 and rows[-1]["MB"] == 5.0 and rows[-2]["s"] == 5.0
    assert rows[3] == {
        "case": "prepare 8 clips, streamed from parquet, tiny, 0 workers",
        "clips/s": 8.0,
        "s": 1.0,
    }


def test_text_checks_are_preparations_unknown_token_included(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from elise.text import HFTokenizer

    words = ["[UNK]", "[", "]", "0", "1", "clip", "number", "."] + [str(i) for i in range(2, 12)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rows = clips()
    rows[4]["text"] = "clip zebra 4"  # "zebra" is the unknown token
    rows[6]["text"] = "?! ..."  # no letter or digit
    (tmp_path / "src").mkdir()
    write_ipc(tmp_path / "src" / "a.arrow", table(rows, "kt"))
    data = prepare_codes(
        cfg(tmp_path / "src", tmp_path / "c"), HFTokenizer.from_json(tok.to_str()), progress=False
    )
    skipped = {s["id"]: s["reason"] for s in data.report["items"]}
    assert skipped == {
        "c003": "empty_text",
        "c004": "untokenizable_text",
        "c005": "too_short",
        "c006": "unspeakable_text",
    }
    assert data.report["kept"] == 8


def test_split_is_assign_splits_over_the_kept_clips(tmp_path: Path) -> None:
    from elise.data.split import assign_splits, split_scores

    rows = clips(n=30)
    ids = [r["id"] for r in rows]
    lowest = [ids[k] for k in np.argsort(split_scores(ids, 0))[:2].tolist()]
    for r in rows:  # the two ids of lowest hash (val with val_count=2 over every row) are skipped
        if r["id"] in lowest:
            r["text"] = ""
    (tmp_path / "src").mkdir()
    write_ipc(tmp_path / "src" / "a.arrow", table(rows[:12], "tk"))
    write_ipc(tmp_path / "src" / "b.arrow", table(rows[12:], "tk"))
    for kw in (
        {"val_count": 2},
        {"val_count": None, "val_fraction": 1e-6},
        {"val_count": None, "val_fraction": 1.0},
    ):
        data = prepare_codes(cfg(tmp_path / "src", tmp_path / "c", **kw), ByteTokenizer(), progress=False)
        examples = examples_of(data.index)
        kept = [e.id for e in examples]
        want = assign_splits(kept, kw.get("val_fraction", 0.05), kw["val_count"], 0)
        assert {e.id: e.split for e in examples} == want, kw
        n_val = sum(s == "val" for s in want.values())
        assert (
            data.report["val"]
            == n_val
            == (len(kept) - 1 if kw.get("val_fraction") == 1.0 else kw["val_count"] or 1)
        )
        assert ClipIndex(data.index).meta["report"]["val"] == n_val


def test_a_finished_stream_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = clips(seed=2)
    (tmp_path / "pq").mkdir()
    pq.write_table(table(rows, "kt"), tmp_path / "pq" / "train-0000.parquet")
    c = cfg(tmp_path / "pq", tmp_path / "c", streaming=True)
    first = prepare_codes(c, ByteTokenizer(), progress=False)

    def no_stream(*args: object, **kw: object):
        raise AssertionError("the stream was opened again")

    monkeypatch.setattr(datasets, "load_dataset", no_stream)
    again = prepare_codes(c, ByteTokenizer(), progress=False)
    assert again.index == first.index and again.report == first.report
    with pytest.raises(Exception, match="opened again"):  # another split is another stream
        prepare_codes(c | {"split": "test"}, ByteTokenizer(), progress=False)


def test_a_kill_before_the_split_is_fixed_leaves_no_current_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With val_count the index is written twice (rows, then the whole set's split): a kill between the
    two writes must leave an index the next run rebuilds, not a current-looking one with no val clips."""
    import elise.data.codes as codes

    (tmp_path / "src").mkdir()
    write_ipc(tmp_path / "src" / "a.arrow", table(clips(), "kt"))
    c = cfg(tmp_path / "src", tmp_path / "cache")
    writes = []
    real = codes.write_index

    def killed_on_second(*args: object, **kw: object) -> None:
        writes.append(1)
        if len(writes) == 2:
            raise KeyboardInterrupt("killed")
        real(*args, **kw)

    monkeypatch.setattr(codes, "write_index", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_codes(c, ByteTokenizer(), progress=False)
    monkeypatch.setattr(codes, "write_index", real)
    data = prepare_codes(c, ByteTokenizer(), progress=False)
    assert data.report["val"] == 2
    assert sum(e.split == "val" for e in examples_of(data.index)) == 2  # the rows, not only the report
