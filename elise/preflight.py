"""Checks of a composed training config that need no data and no model: run before anything loads,
so a wrong setting costs a second, not a data preparation. Each problem is one ``UserError`` line."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from elise.config import trainer_precision

SEED_MAX = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything uses
NEEDS = {"mimi": "moshi", "mimi_random": "moshi"}  # codec name -> the package that runs it


class UserError(RuntimeError):
    """A configuration or input problem the user can fix (reported as one line, exit code 2)."""


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (``sys.modules[package] = None`` counts as missing)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def require(package: str, why: str) -> None:
    if not installed(package):
        raise UserError(f"{why} needs the '{package}' package, which is not installed: pip install {package}")


def preflight(cfg: DictConfig) -> None:
    """Refuse settings that cannot train (``UserError``), before data, codec or model load."""
    if OmegaConf.is_missing(cfg, "init_from") or (cfg.get("require_init_from") and not cfg.get("init_from")):
        raise UserError(
            "this experiment fine-tunes existing weights: pass init_from=<transformers dir or elise .ckpt>"
        )
    if int(cfg.trainer.get("max_steps", -1)) <= 0 and not cfg.trainer.get("fast_dev_run"):
        raise UserError("trainer.max_steps must be > 0 (it is also the length of the cosine schedule)")
    if cfg.get("precision") is not None:
        raise UserError(f"precision= moved into the trainer group: write trainer.precision={cfg.precision}")
    try:
        trainer_precision(cfg.trainer.get("precision"))
    except ValueError as err:
        raise UserError(str(err)) from None
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed={seed}: use an integer from 0 to {SEED_MAX}")
    lr = cfg.get("optim", {}).get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"optim.lr={lr}: the learning rate must be a number > 0")
    from elise.optim import optim_settings  # torch: training imports it next anyway

    try:  # the rest of the optim group (impl, min_lr, ...) as the optimizer will read it
        optim_settings(OmegaConf.to_container(cfg.optim, resolve=True) if cfg.get("optim") else None)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from None
    data = cfg.get("data") or {}
    max_samples = data.get("max_samples")
    if max_samples is not None and int(max_samples) <= 0:
        raise UserError(
            f"data.max_samples={max_samples} leaves no data: use null (every item) or a number > 0"
        )
    check_devices(cfg.trainer)
    codec = str((cfg.get("codec") or {}).get("name", ""))
    if codec in NEEDS:
        require(NEEDS[codec], f"codec={codec}")
    init_from = cfg.get("init_from")
    if init_from and Path(str(init_from)).is_dir():
        require("transformers", f"init_from={init_from} (a transformers directory)")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and str(ckpt_path) != "last" and not Path(str(ckpt_path)).expanduser().is_file():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file")


def check_devices(trainer: DictConfig) -> None:
    """A GPU asked for and none visible; more CPU processes than CPUs."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but no GPU is visible to torch: use trainer=cpu (or trainer.accelerator=cpu)"
        )
    devices = cpu_processes_per_node(trainer)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if on_cpu(trainer) and devices > cpus:
        raise UserError(
            f"trainer.devices={devices} would start {devices} training processes on {cpus} CPUs: use trainer.devices<={cpus}"
        )


def cpu_processes_per_node(trainer: DictConfig) -> int:
    """The training processes ``trainer.devices`` starts per node on a CPU (an int or a digit string;
    ``auto``: 1)."""
    devices = trainer.get("devices", 1)
    return int(devices) if str(devices).isdigit() else 1


def on_cpu(trainer: DictConfig) -> bool:
    """Whether ``trainer`` runs on the CPU (``accelerator`` cpu, or auto without a GPU)."""
    import torch

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
