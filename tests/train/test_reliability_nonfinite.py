"""The non-finite guard: a NaN/Inf loss or gradient skips the optimizer step (weights and AdamW
state untouched, counted in ``train/skipped_steps``); ``optim.max_bad_steps`` in a row stop training
with a one-line message (exit 3) and a checkpoint holding the weights from before the first bad step."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from elise.config import compose
from elise.module import EliseModule
from elise.train import main as train_main
from elise.train import train

BASE = [
    "trainer.val_check_interval=100",
    "callbacks.best=null",
    "callbacks.audio_samples=null",
    "callbacks.checkpoint.every_n_train_steps=100",
    "optim.warmup_steps=1",
]


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The loss of every micro-batch at the given global steps becomes NaN (so do its gradients)."""
    real = EliseModule._loss

    def loss(self, batch, fraction, generator):
        out = real(self, batch, fraction, generator)
        if self.training and self.global_step in steps:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(EliseModule, "_loss", loss)


class Snapshots(pl.Callback):
    """Weights and AdamW state after every optimizer step (key: global_step after the step)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.adam: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.weights[trainer.global_step] = {k: v.clone() for k, v in module.model.state_dict().items()}
        state = trainer.optimizers[0].state.get(module.model.audio_head)
        if state:  # none before the first step (micro-batches of an accumulated step)
            self.adam[trainer.global_step] = torch.cat(
                [state["exp_avg"].flatten(), state["exp_avg_sq"].flatten()]
            )


def column(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_steps_are_skipped_and_counted(fast_overrides, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {2, 3})
    snaps = Snapshots()
    cfg = compose(
        "train",
        [*fast_overrides, *BASE, "trainer.max_steps=6", f"hydra.run.dir={tmp_path}"],
        return_hydra_config=True,
    )
    metrics = train(cfg, callbacks=[snaps])
    w, adam = snaps.weights, snaps.adam
    assert same(w[2], w[3]) and same(w[2], w[4])  # steps 2 and 3 (0-based) changed no weight
    assert torch.equal(adam[2], adam[4]) and torch.isfinite(adam[4]).all()  # nor the AdamW moments
    assert not same(w[4], w[5]) and all(torch.isfinite(v).all() for v in w[6].values())  # training goes on
    skipped = column(tmp_path, "train/skipped_steps")
    assert skipped == {0: 0.0, 1: 0.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0}
    losses = column(tmp_path, "train/loss")
    assert [s for s, v in losses.items() if v != v] == [2, 3] and metrics["train/loss"] == losses[5]


def test_inf_gradient_with_accumulation_skips_the_whole_step(fast_overrides, tmp_path):
    """An Inf gradient in one micro-batch poisons the accumulated gradient: that step is skipped."""

    class InfGrad(pl.Callback):
        def on_after_backward(self, trainer, module) -> None:
            if trainer.global_step == 1 and module._micro[1] == 0:
                module.model.audio_head.grad[0, 0, 0] = float("inf")

    snaps = Snapshots()
    extra = ["trainer.max_steps=3", "trainer.accumulate_grad_batches=2", f"hydra.run.dir={tmp_path}"]
    cfg = compose("train", [*fast_overrides, *BASE, *extra], return_hydra_config=True)
    train(cfg, callbacks=[InfGrad(), snaps])
    assert same(snaps.weights[1], snaps.weights[2]) and not same(snaps.weights[2], snaps.weights[3])
    assert column(tmp_path, "train/skipped_steps")[2] == 1.0


def test_too_many_bad_steps_stop_with_a_checkpoint_from_before_them(
    fast_overrides, tmp_path, monkeypatch, capsys
):
    nan_loss_at(monkeypatch, set(range(2, 100)))
    snaps = Snapshots()
    extra = ["trainer.max_steps=20", "optim.max_bad_steps=3", f"hydra.run.dir={tmp_path}"]
    cfg = compose("train", [*fast_overrides, *BASE, *extra], return_hydra_config=True)

    import elise.train as train_mod

    monkeypatch.setattr(train_mod, "train", lambda c: train(c, callbacks=[snaps]))
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 3 and "\n" not in err
    assert "3 consecutive steps (from step 2)" in err and "max_bad_steps=3" in err
    assert max(snaps.weights) == 5  # steps 2, 3, 4 were bad: stopped after the third
    saved = tmp_path / "checkpoints" / "nonfinite-step0000005.ckpt"
    assert saved.name in err and saved.is_file()
    state = torch.load(saved, map_location="cpu", weights_only=True)
    weights = {k[len("model.") :]: v for k, v in state["state_dict"].items()}
    assert same(snaps.weights[2], weights)  # the weights after step 1, before the first bad step
    assert state["elise_nonfinite"] == [3, 3]
