"""Checkpoint safety: atomic saves (tmp + fsync + rename), a corrupt ``last.ckpt`` skipped on
``ckpt_path=last``, ``keep_last``, and crafted files refused on the training resume/init paths."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from testkit import checkpointing_run

from elise.checkpoints import resolve_ckpt_path
from elise.config import compose
from elise.train import AtomicCheckpointIO, train
from elise.train import main as train_main

STEPS = 6
BASE = checkpointing_run(STEPS)


def run(tmp: Path, overrides: list[str], extra: list[str]) -> dict[str, float]:
    cfg = compose("train", [*overrides, f"hydra.run.dir={tmp}", *extra], return_hydra_config=True)
    return train(cfg)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory, fast_overrides) -> Path:
    """6 steps, a checkpoint every 2 steps, only the 2 newest kept."""
    run_dir = tmp_path_factory.mktemp("keep")
    run(run_dir, fast_overrides, [*BASE, "callbacks.checkpoint.keep_last=2"])
    return run_dir


def test_keep_last_keeps_the_k_newest_step_checkpoints(kept_run):
    names = sorted(p.name for p in (kept_run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000004.ckpt", "step0000006.ckpt"]  # step 2 deleted; no tmp files left


def test_atomic_save_fsyncs_renames_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    io.save_checkpoint({"x": torch.arange(3)}, path)
    assert len(synced) == 2  # the file, then its directory (the rename)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.ckpt"]  # tmp file removed


def test_trainer_saves_through_the_atomic_io(fast_overrides, tmp_path, monkeypatch):
    """The Trainer's checkpoints come from AtomicCheckpointIO (Lightning's fsspec save writes to /tmp)."""
    import elise.train as train_mod

    seen = []

    class Spy(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            seen.append(Path(path).name)
            super().save_checkpoint(checkpoint, path, storage_options)

    monkeypatch.setattr(train_mod, "AtomicCheckpointIO", Spy)
    run(tmp_path, fast_overrides, [*BASE, "trainer.max_steps=2", "data.max_samples=2"])
    assert seen == ["step0000002.ckpt", "last.ckpt"]


def test_corrupt_last_is_reported_and_the_previous_checkpoint_used(
    kept_run, fast_overrides, tmp_path, caplog
):
    run_dir = tmp_path / "run"
    run(run_dir, fast_overrides, [*BASE, "callbacks.checkpoint.keep_last=2"])
    ckpts = run_dir / "checkpoints"
    for mtime, name in ((1000, "step0000004.ckpt"), (1100, "step0000006.ckpt"), (1200, "last.ckpt")):
        os.utime(ckpts / name, (mtime, mtime))  # saved in this order
    last = ckpts / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated mid-write (what a non-atomic save leaves)
    os.utime(last, (1200, 1200))
    # a leftover temporary file of an interrupted save is newer still: never picked
    (ckpts / ".step0000008.ckpt.123.tmp").write_bytes(data[:100])
    caplog.set_level(logging.WARNING, logger="elise.train")
    assert Path(resolve_ckpt_path("last", run_dir)).name == "step0000006.ckpt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "last.ckpt" in warnings[0] and "truncated" in warnings[0]
    assert "\n" not in warnings[0]

    # garbage in the next newest too: back to step 4; the resumed run redoes steps 4..5 exactly
    (ckpts / "step0000006.ckpt").write_bytes(b"\x00garbage" * 100)
    os.utime(ckpts / "step0000006.ckpt", (1100, 1100))
    assert Path(resolve_ckpt_path("last", run_dir)).name == "step0000004.ckpt"
    run(run_dir, fast_overrides, [*BASE, "callbacks.checkpoint.keep_last=2", "ckpt_path=last"])
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "last.ckpt",
        "step0000004.ckpt",
        "step0000006.ckpt",
    ]
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    ref, got = weights(kept_run / "checkpoints" / "last.ckpt"), weights(last)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # the same final weights as the unbroken run


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/elise_pwned_train",))


@pytest.mark.parametrize("key", ["ckpt_path", "init_from"])
def test_crafted_checkpoint_is_refused_on_resume_and_init_from(key, fast_overrides, tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {"model": {}}, "x": Payload()}, evil)
    if os.path.exists("/tmp/elise_pwned_train"):
        os.remove("/tmp/elise_pwned_train")
    cfg = compose(
        "train", [*fast_overrides, f"{key}={evil}", f"hydra.run.dir={tmp_path}"], return_hydra_config=True
    )
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "refusing to load" in err, err
    assert not os.path.exists("/tmp/elise_pwned_train")


def test_resume_reads_the_checkpoint_once_and_a_longer_max_steps_stretches_the_schedule(
    kept_run, fast_overrides, tmp_path, monkeypatch, caplog
):
    """``continue: ... trainer.max_steps=<more>`` (the summary's advice): the cosine ends at the new
    max_steps from the next step on, the log says so, and the checkpoint file is read once (it was
    opened 4 times by elise, then by Lightning)."""
    import shutil

    import lightning.pytorch as pl

    from elise.optim import WarmupCosine

    run_dir = tmp_path / "run"
    shutil.copytree(kept_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    optim = torch.load(last, weights_only=True)["hyper_parameters"]["optim"]
    loads: list[str] = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        loads.append(Path(str(f if isinstance(f, str | os.PathLike) else getattr(f, "path", f.name))).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    lrs: dict[int, float] = {}

    class Rates(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    caplog.set_level(logging.INFO, logger="elise.optim")
    more = 10
    cfg = compose(
        "train",
        [*fast_overrides, *BASE, "callbacks.checkpoint.keep_last=2", f"trainer.max_steps={more}"]
        + [f"hydra.run.dir={run_dir}", "ckpt_path=last"],
        return_hydra_config=True,
    )
    train(cfg, callbacks=[Rates()])
    assert loads.count("last.ckpt") == 1
    schedule = WarmupCosine(optim["warmup_steps"], more, optim["min_lr"] / optim["lr"])
    assert sorted(lrs) == list(range(STEPS, more))
    for step, lr in lrs.items():  # was min_lr on every step: the old schedule ended at step 6
        assert lr == pytest.approx(optim["lr"] * schedule(step), rel=1e-6), step
    [line] = [r.getMessage() for r in caplog.records if "schedule now ends" in r.getMessage()]
    assert f"resuming at step {STEPS} with trainer.max_steps={more}" in line and "ended at 6" in line
    assert torch.load(last, weights_only=True)["hyper_parameters"]["total_steps"] == more
