"""Training configs compose to what the README promises; optimiser groups and schedule numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from elise.config import CONF_DIR, compose
from elise.model import build_model
from elise.optim import WarmupCosine, build_optimizer, param_groups

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_user_command_composes_to_the_elise_recipe():
    cfg = compose("train", ["trainer.devices=1", "trainer.precision=bf16-mixed"])
    assert cfg.model.name == "marvis_250m" and cfg.model.text_vocab_size == 49152
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 1
    assert cfg.data.source == "elise" and cfg.data.name == "Jinsaryko/Elise"
    assert (cfg.data.max_samples, cfg.data.max_tokens) == (16, 5000)
    assert cfg.codec.name == "mimi"
    assert cfg.optim.lr == 1e-4 and cfg.callbacks.checkpoint.every_n_train_steps == 10_000
    assert set(cfg.logger) == {"csv", "wandb"}
    assert cfg.logger.wandb.project == "elise" and cfg.logger.wandb.offline is True
    assert cfg.callbacks.best.monitor == "val/loss"


def test_sweep_command_overrides_win_over_the_experiment():
    cfg = compose("train", ["optim.lr=3e-4", "model=tiny", "experiment=elise"])
    assert cfg.optim.lr == 3e-4 and cfg.model.name == "tiny"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name: str):
    cfg = compose("train", [f"experiment={name}"])
    assert cfg.trainer.max_steps > 0 and cfg.trainer.precision
    assert "_target_" in cfg.trainer and cfg.model.name in ("demo", "marvis_250m")
    if cfg.model.name == "demo":
        assert build_model(dict(cfg.model)).cfg.text_vocab_size == 259


def test_experiment_list_is_complete():
    assert {"elise", "elise_finetune", "demo"} <= set(EXPERIMENTS)


def test_finetune_experiment_requires_init_from_and_trains_every_frame():
    cfg = compose("train", ["experiment=elise_finetune"])
    assert cfg.require_init_from and cfg.init_from is None
    assert cfg.loss.decoder_fraction == 1.0 and cfg.optim.lr < 1e-4


@pytest.mark.parametrize("group", ["cpu", "gpu", "ddp", "fsdp"])
def test_trainer_groups_compose(group: str):
    cfg = compose("train", [f"trainer={group}", "trainer.num_nodes=2"])
    assert cfg.trainer.num_nodes == 2
    if group == "ddp":
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ == "DDPStrategy"


def test_default_config_needs_no_launcher_or_sweeper_plugins():
    cfg = compose("train", [], return_hydra_config=True)
    assert "basic" in cfg.hydra.launcher._target_.lower() and "basic" in cfg.hydra.sweeper._target_.lower()
    assert "subdir" in cfg.hydra.sweep and cfg.hydra.job.chdir is False
    assert (Path(CONF_DIR) / "hydra/launcher/slurm.yaml").is_file()
    assert (Path(CONF_DIR) / "hparams_search/optuna.yaml").is_file()


def test_schedule_warmup_then_cosine_to_floor():
    f = WarmupCosine(warmup=10, total=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone after warmup


def test_scheduler_steps_after_each_optimizer_step():
    model = build_model("tiny")
    opt, sched = build_optimizer(model, {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 4}, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_weight_decay_only_on_matrices_and_frozen_params_left_out():
    model = build_model("tiny")
    model.backbone.requires_grad_(False)
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.audio_head for p in decay["params"])  # the 3-D head decays
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in (decay, no_decay) for p in g["params"]} == trainable
    assert not any(id(p) in trainable for p in model.backbone.parameters())
    opt, _ = build_optimizer(model, {"betas": [0.9, 0.95]}, total_steps=10)
    assert opt.defaults["betas"] == (0.9, 0.95) and isinstance(opt, torch.optim.AdamW)
