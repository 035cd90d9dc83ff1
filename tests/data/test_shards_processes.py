"""The shard store across processes (slow tier): a 2-process torchrun prepare equals one run, a
SIGKILL while shards are written leaves whole shards only and the rerun completes, and a 2-process
DDP run trains from the shards and resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import lj_folder

from elise.codec import build_codec
from elise.data.codes import examples_of
from elise.data.prepare import prepare
from elise.data.shards import read_ipc
from elise.text import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",
}
SHARDS = ["codec=tiny", "data.store=shards", "data.shard_mb=0.003"]

pytestmark = pytest.mark.slow


def by_id(index: Path) -> dict:
    return {e.id: (e.text_ids, e.split, e.load_codes().tolist()) for e in examples_of(index)}


def keys(cache: Path) -> set[str]:
    return {k for f in (cache / "shards").glob("*.arrow") for k in read_ipc(f).column("key").to_pylist()}


def one_run(cache: Path, **data: object):
    cfg = {"source": "sample", "cache_dir": str(cache), "store": "shards", "shard_mb": 0.003, **data}
    return prepare(cfg, build_codec("tiny"), ByteTokenizer(), progress=False)


def test_torchrun_two_processes_prepare_what_one_process_does(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "elise.prepare"]
    cmd += [*SHARDS, "data=sample", f"paths.cache_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = tmp_path / "two" / "codes"
    writers = {f.name.split("-")[0] for f in (cache / "shards").glob("*.arrow")}
    assert writers == {"s0of2", "s1of2"}  # each rank encoded its own slice
    one = one_run(tmp_path / "one")
    [index] = cache.glob("index-*.arrow")
    assert index.name == one.index.name and by_id(index) == by_id(one.index)
    assert keys(cache) == keys(tmp_path / "one")
    import json

    report = json.loads((cache / "prepare_report.json").read_text())
    for name in ("total", "kept", "train", "val", "skipped", "speakers"):
        assert report[name] == one.report[name]
    assert report["encoded"] == one.report["encoded"] == 16


def test_torchrun_two_processes_streaming_audio_prepare_what_one_full_read_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from elise.bench.data import parquet_of
    from elise.data.sources import sample_root

    table = parquet_of(sample_root(), tmp_path / "sample.parquet")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "elise.prepare"]
    cmd += [
        *SHARDS,
        "data=elise",
        f"data.path={table}",
        "data.streaming=true",
        f"paths.cache_dir={tmp_path / 'two'}",
    ]
    env = ENV | {"HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = tmp_path / "two" / "codes"
    assert {f.name.split("-")[0] for f in (cache / "shards").glob("*.arrow")} == {"s0of2", "s1of2"}
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    one = one_run(tmp_path / "one", source="elise", path=str(table))  # a full (non-streaming) read
    [index] = cache.glob("index-*.arrow")
    assert index.name == one.index.name and by_id(index) == by_id(one.index)
    assert keys(cache) == keys(tmp_path / "one")


def test_sigkill_while_writing_shards_leaves_whole_shards_and_the_rerun_completes(tmp_path: Path) -> None:
    root = lj_folder(tmp_path / "lj", 48, seconds=0.8)
    cmd = [sys.executable, "-m", "elise.prepare", *SHARDS, "data=ljspeech", f"data.root={root}"]
    cmd += ["data.shard_mb=0.0005", f"paths.cache_dir={tmp_path / 'c'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "c" / "codes" / "shards"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and len(list(folder.glob("*.arrow"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(folder.glob("*.arrow"))
    assert len(written) >= 2 and not list(tmp_path.glob("c/codes/index-*"))
    for f in written:
        read_ipc(f)  # every named shard is whole
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(folder.glob(".*.tmp"))
    [index] = (tmp_path / "c" / "codes").glob("index-*.arrow")
    clean = prepare(
        {"source": "ljspeech", "root": str(root), "cache_dir": str(tmp_path / "clean"), "store": "shards"},
        build_codec("tiny"), ByteTokenizer(), progress=False,
    )  # fmt: skip
    assert by_id(index) == by_id(clean.index) and len(clean.examples) == 48


def train_py(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def batches(run: Path) -> list[list[str]]:
    return [(run / f"batches_rank{r}.txt").read_text().split() for r in (0, 1)]


def test_ddp_two_processes_train_from_shards_and_resume_exactly(
    fast_overrides: list[str], code_cache: Path, tmp_path: Path
) -> None:
    common = [
        *fast_overrides,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.max_samples=2",
    ]
    common += [
        "data.store=shards",
        "data.shard_mb=0.003",
        "+callbacks.batch_log._target_=elise.callbacks.BatchLog",
    ]
    common += ["callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2"]
    train_py([*common, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'a'}"])
    train_py([*common, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'a'}"])
    train_py([*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'b'}"])
    resumed, straight = batches(tmp_path / "a"), batches(tmp_path / "b")
    assert resumed == straight  # the resumed run trained on the same clips at every step, per rank
    steps = [set(resumed[r][1::2][s].split(",")) for r in (0, 1) for s in range(4)]
    assert all(not steps[s] & steps[4 + s] for s in range(4))  # ranks disjoint at every step
    assert list((code_cache / "codes" / "shards").glob("*.arrow")) and list(
        (code_cache / "codes").glob("index-*")
    )
