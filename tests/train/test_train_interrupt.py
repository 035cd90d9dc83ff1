"""Training stops the way a user expects: Ctrl-C saves and says how to resume, a wrong setting is one
line before anything loads (no run dir left behind), a run that trains nothing fails, a finished run
prints what to do next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from elise.cli import check_overrides, verbatim_args
from elise.config import compose
from elise.preflight import UserError, preflight
from elise.train import ctrl_c_stops_at_step_end, train

ROOT = Path(__file__).resolve().parents[2]


def train_cmd(tmp: Path, code_cache: Path, *args: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "experiment=demo", "threads=1",
        f"paths.cache_dir={code_cache}", f"hydra.run.dir={tmp}/run", *args,
    ]  # fmt: skip


def test_first_ctrl_c_stops_at_the_step_end_second_aborts():
    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers ignore SIGINT
    try:
        with ctrl_c_stops_at_step_end(trainer):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert trainer._signal_connector.received_sigterm and trainer._elise_ctrl_c
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, code_cache):
    cmd = train_cmd(tmp_path, code_cache, "trainer.max_steps=100000", "trainer.val_check_interval=100000")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 200) and time.time() < deadline:
        time.sleep(0.5)  # a few steps logged
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    saved = list((tmp_path / "run" / "checkpoints").glob("sigterm-step*.ckpt"))
    assert proc.returncode == 130 and saved, err
    assert "resume: python train.py" in err and f"ckpt_path={saved[0]}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["seed=-1"], "seed=-1: use an integer from 0 to 4294967295"),
        (["seed=4294967296"], "seed=4294967296"),
        (["optim.lr=-1"], "optim.lr=-1: the learning rate must be a number > 0"),
        (["optim.lr=0"], "optim.lr=0"),
        (["optim.impl=bogus"], "optim.impl must be one of auto, fused, foreach, for_loop, got 'bogus'"),
        (["optim.min_lr=1"], "need 0 <= min_lr <= lr"),
        (["data.max_samples=0"], "data.max_samples=0 leaves no data"),
        (["trainer=cpu", "trainer.devices=64"], "trainer.devices=64 would start 64 training processes"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt: no such checkpoint file"),
    ],
)
def test_preflight_refuses_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        preflight(check_overrides("train", verbatim_args(overrides)))


def test_preflight_needs_a_gpu_and_the_packages(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for override in ("trainer=gpu", "trainer.accelerator=gpu"):
        with pytest.raises(UserError, match="no GPU is visible"):
            preflight(check_overrides("train", [override]))
    monkeypatch.setitem(sys.modules, "moshi", None)  # as if not installed
    with pytest.raises(UserError, match="codec=mimi needs the 'moshi' package"):
        preflight(check_overrides("train", ["codec=mimi"]))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match="needs the 'transformers' package"):
        preflight(check_overrides("train", ["codec=tiny", f"init_from={ROOT / 'elise'}"]))


@pytest.mark.parametrize(
    "arg,message",
    [
        ("optim.lr=-1", "error: optim.lr=-1: the learning rate must be a number > 0"),
        (
            "trainer.max_steps=0",
            "error: trainer.max_steps must be > 0 (it is also the length of the cosine schedule)",
        ),
    ],
)
def test_wrong_setting_exits_2_and_leaves_no_run_dir(tmp_path, arg, message):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), arg], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == []  # no outputs/train/runs/<time> left behind


def test_a_run_that_trains_nothing_fails_naming_the_setting(tmp_path, fast_overrides):
    cfg = compose(
        "train",
        [*fast_overrides, "data.max_tokens=10", f"hydra.run.dir={tmp_path}"],
        return_hydra_config=True,
    )
    with pytest.raises(UserError, match=r"no training step ran.*data.max_tokens=10"):
        train(cfg)


def test_demo_run_console_ends_with_a_summary(tmp_path, code_cache):
    cmd = train_cmd(tmp_path, code_cache, "trainer.max_steps=2", "trainer.val_check_interval=2")
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout.replace("\r", "\n")
    assert "trained 2 steps (trainer.max_steps=2); " in out and "train/loss " in out
    run = tmp_path / "run"
    assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out
    assert f"synthesize: python synthesize.py ckpt={run / 'checkpoints' / 'last.ckpt'} text=" in out
    assert "continue: python train.py experiment=demo" in out
    assert "step (epoch 0): 100%|" in out and "| 2/2 [" in out  # global step out of max_steps
    for noise in ("litlogger", "LeafSpec", "exists and is not empty", "Traceback"):
        assert noise not in done.stderr, noise
    assert done.stderr.count("GPU available") == 1  # Lightning's INFO lines once
