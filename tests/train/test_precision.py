"""``trainer.precision=auto``: bf16-mixed only where the measured bf16 matmuls are fast enough."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import elise.precision as precision
from elise.config import compose, trainer_precision
from elise.model.presets import preset
from elise.precision import choose_precision, probe_shapes, time_matmuls
from elise.train import train


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(1.0, 0.5, "bf16-mixed"), (1.0, 0.8, "32-true")])
def test_cpu_choice_follows_the_measured_speedup(monkeypatch, fp32, bf16, expected):
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes: (fp32, bf16))
    choice = choose_precision(preset("marvis_250m").to_dict(), cpu=True)
    assert choice.precision == expected and (choice.fp32_s, choice.bf16_s) == (fp32, bf16)
    assert f"fp32 {fp32 * 1e3:.1f} ms" in choice.reason and f"({fp32 / bf16:.2f}x" in choice.reason


def test_probe_times_the_backbone_mlp_shapes():
    cfg = preset("marvis_250m").to_dict()
    assert probe_shapes(cfg, rows=256) == [(256, 1536, 8192), (256, 8192, 1536), (8192, 256, 1536)]
    fp32, bf16 = time_matmuls([(4, 8, 16)], rounds=1)
    assert fp32 > 0 and bf16 > 0
    assert trainer_precision("auto") == trainer_precision("AUTO") == "auto"


def test_auto_reaches_the_trainer_and_logs_the_timings(monkeypatch, fast_overrides, tmp_path: Path, caplog):
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes: (0.3, 0.1))
    seen = {}

    class Precision(pl.Callback):
        def on_train_start(self, trainer, module):
            seen["precision"] = trainer.precision

    overrides = [*fast_overrides, "trainer.precision=auto", "trainer.max_steps=1", "data.max_samples=2",
                 "callbacks.checkpoint=null", "callbacks.audio_samples=null", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="elise.train"):
        metrics = train(compose("train", overrides, return_hydra_config=True), callbacks=[Precision()])
    assert seen["precision"] == "bf16-mixed" and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "trainer.precision=auto -> bf16-mixed: CPU matmul probe" in caplog.text
    assert "fp32 300.0 ms, bf16 100.0 ms (3.00x" in caplog.text


def test_several_cpu_processes_keep_fp32_without_a_probe(monkeypatch):
    """CPU DDP ranks would each time their own probe on shared cores and could choose differently."""
    monkeypatch.setattr(precision, "time_matmuls", lambda shapes: pytest.fail("probed"))
    choice = choose_precision(preset("marvis_250m").to_dict(), cpu=True, processes=2)
    assert choice.precision == "32-true" and "2 CPU processes" in choice.reason


@pytest.mark.parametrize(("devices", "processes"), [(2, 2), ("2", 2), ("auto", 1), (1, 1)])
def test_cpu_processes_per_node_reads_trainer_devices(devices, processes):
    from omegaconf import OmegaConf

    from elise.preflight import cpu_processes_per_node

    assert cpu_processes_per_node(OmegaConf.create({"devices": devices})) == processes
