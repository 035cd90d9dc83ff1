"""Real kills in subprocesses (slow tier): ``train.py`` killed with SIGKILL (or stopped by SIGTERM)
mid-run and resumed with ``ckpt_path=last`` matches an uninterrupted run exactly (per-step losses in
metrics.csv, final weights); ``python -m elise.prepare`` killed mid-way leaves no partial cache entry
and its rerun encodes only what is missing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from testkit import checkpointing_run

ROOT = Path(__file__).resolve().parents[2]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}

# A callback that parks the process after step N (a deterministic point to kill it at): it writes
# a marker file, then waits; on SIGTERM it returns so Lightning can save and exit.
BLOCKER = """
import pathlib, time
import lightning.pytorch as pl

class BlockAfter(pl.Callback):
    def __init__(self, step, marker):
        self.step, self.marker = int(step), pathlib.Path(marker)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text("parked")
            while not trainer.received_sigterm:
                time.sleep(0.05)
"""

STEPS = 8
TRAIN = checkpointing_run(STEPS)


def start(args: list[str], extra_path: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.05)


def metrics(run_dir: Path) -> dict[str, dict[int, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = ("train/loss", "train/loss_cb17", "train/skipped_steps", "train/lr")
    return {k: {int(r["step"]): r[k] for r in rows if r.get(k)} for k in keys}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fast_overrides) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = start([sys.executable, "train.py", *fast_overrides, *TRAIN, f"hydra.run.dir={run_dir}"])
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_losses_and_weights(sig, reference, fast_overrides, tmp_path):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "blocker.py").write_text(BLOCKER, encoding="utf-8")
    run_dir, marker = tmp_path / "run", tmp_path / "parked"
    args = [sys.executable, "train.py", *fast_overrides, *TRAIN, f"hydra.run.dir={run_dir}"]
    block = [
        "+callbacks.block._target_=blocker.BlockAfter",
        "+callbacks.block.step=5",
        f"+callbacks.block.marker={marker}",
    ]
    proc = start([*args, *block], extra_path=tmp_path / "hooks")
    wait_for(marker.exists, proc)  # step 5 done; checkpoints at steps 2 and 4 exist
    proc.send_signal(sig)
    code, err = finish(proc)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and ckpts == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    else:
        assert code == 143 and "sigterm-step0000005.ckpt" in ckpts, err[-3000:]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))

    proc = start([*args, "ckpt_path=last"])
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    expected = "last.ckpt" if sig == signal.SIGKILL else "sigterm-step0000005.ckpt"  # the newest
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / expected}" in err
    got, ref = metrics(run_dir), metrics(reference)
    assert sorted(got["train/loss"]) == list(range(STEPS))
    assert got == ref  # every step's loss, per-codebook loss, skip count and lr, as written
    ref_w, got_w = final_weights(reference), final_weights(run_dir)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


SLOW_SAVE = """
import time
from elise.data.cache import CodeCache
real = CodeCache.save
def save(self, key, codes):
    time.sleep(0.3)  # widens the window to kill in; the real save (tmp file + rename) follows
    return real(self, key, codes)
CodeCache.save = save
import runpy
runpy.run_module("elise.prepare", run_name="__main__", alter_sys=True)  # as `python -m elise.prepare`
"""


@pytest.mark.slow
def test_killed_prepare_leaves_no_partial_entry_and_resumes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    (data / "wavs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 24
    for i in range(n):
        sf.write(
            data / "wavs" / f"c{i:02d}.wav", 0.2 * rng.standard_normal(24_000).astype(np.float32), 24_000
        )
    (data / "metadata.csv").write_text("".join(f"c{i:02d}|Clip number {i}.\n" for i in range(n)))
    args = [
        "data=ljspeech",
        f"data.root={data}",
        "codec=tiny",
        "codec.batch_size=1",
        f"paths.cache_dir={cache}",
    ]
    (tmp_path / "slow_prepare.py").write_text(SLOW_SAVE, encoding="utf-8")
    proc = start([sys.executable, str(tmp_path / "slow_prepare.py"), *args])
    wait_for(lambda: len(list(cache.rglob("*.npy"))) >= 3, proc)
    proc.kill()
    proc.wait(timeout=60)
    entries = list(cache.rglob("*.npy"))
    assert 3 <= len(entries) < n
    for path in entries:  # every entry that exists is whole
        assert np.load(path).shape[0] == 32
    done = len(entries)

    proc = start([sys.executable, "-m", "elise.prepare", *args])
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    report = json.loads((cache / "codes" / "prepare_report.json").read_text())
    assert (report["kept"], report["cached"], report["encoded"]) == (n, done, n - done)
    assert len(list(cache.rglob("*.npy"))) == n
