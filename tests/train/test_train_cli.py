"""``train.py`` as users run it, in subprocesses: a two-value multirun and a 2-process DDP run on CPU
(gloo; ~20 s with one torch thread per process)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def train_py(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multirun_gives_one_run_dir_per_value(fast_overrides, tmp_path):
    args = ["-m", *fast_overrides, "optim.lr=1e-3,2e-3", "trainer.max_steps=2", "optim.warmup_steps=1"]
    args += ["callbacks.checkpoint=null", "trainer.val_check_interval=100", f"hydra.sweep.dir={tmp_path}"]
    proc = train_py(args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = []
    for job in ("0", "1"):
        metrics = rows(tmp_path / job / "metrics.csv")
        assert [int(r["step"]) for r in metrics if r.get("train/loss")] == [0, 1]
        lrs.append(float(next(r["train/lr"] for r in metrics if r.get("train/lr"))))
        assert (tmp_path / job / ".hydra" / "overrides.yaml").is_file()
    assert lrs == pytest.approx([1e-3, 2e-3])  # warmup of 1 step: the full lr at step 0


def test_ddp_two_cpu_processes_shard_batches_save_and_resume(fast_overrides, tmp_path):
    common = [
        *fast_overrides,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.max_samples=2",
    ]
    common += ["+callbacks.batch_log._target_=elise.callbacks.BatchLog", f"hydra.run.dir={tmp_path}"]
    common += ["callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2"]
    proc = train_py([*common, "trainer.max_steps=2"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step0000002.ckpt").is_file()
    proc = train_py([*common, "trainer.max_steps=4", "ckpt_path=last"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step0000004.ckpt").is_file()
    per_rank = []
    for rank in (0, 1):
        lines = (tmp_path / f"batches_rank{rank}.txt").read_text().split()
        per_rank.append(
            [(int(s), set(ids.split(","))) for s, ids in zip(lines[::2], lines[1::2], strict=True)]
        )
    assert [s for s, _ in per_rank[0]] == [s for s, _ in per_rank[1]] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(*per_rank, strict=True):
        assert a and b and not a & b  # the ranks train on different clips at every step
    assert [int(r["step"]) for r in rows(tmp_path / "metrics.csv") if r.get("train/loss")] == [0, 1, 2, 3]
