"""AdamW with decay on >=2-D weights only, and a linear-warmup + cosine-to-a-floor schedule.

The schedule is a ``LambdaLR`` over a small picklable object (its state is plain numbers, so it
goes into a ``weights_only`` checkpoint) stepped once per optimizer step, after the optimizer
(Lightning's ``interval: step``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from elise.config import conf_defaults


def optim_settings(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``optim`` config as a plain dict of primitives, defaults from ``conf/optim/adamw.yaml``."""
    out = conf_defaults("optim/adamw")
    for key, value in dict(cfg or {}).items():
        if value is not None:
            out[key] = value
    out["betas"] = tuple(float(b) for b in out["betas"])
    for key in ("lr", "min_lr", "weight_decay", "eps"):
        out[key] = float(out[key])
    out["warmup_steps"] = int(out["warmup_steps"])
    out["max_bad_steps"] = int(out["max_bad_steps"])
    if out["lr"] <= 0 or out["min_lr"] < 0 or out["min_lr"] > out["lr"]:
        raise ValueError(
            f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={out['lr']}, min_lr={out['min_lr']}"
        )
    return out


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group (>=2-D: matrices, embeddings, the
    3-D audio head) and an undecayed one (1-D: RMSNorm scales). Frozen parameters are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in named:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


class WarmupCosine:
    """LR multiplier at optimizer step ``s``: linear warmup to 1 over ``warmup`` steps, then a
    cosine from 1 down to ``floor`` at ``total`` steps, ``floor`` after that."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup  # non-zero on the very first step
        span = max(self.total - self.warmup, 1)
        t = min((s - self.warmup) / span, 1.0)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(
    model: nn.Module, settings: Mapping[str, Any], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups(model)`` and its warmup + cosine ``LambdaLR``.

    ``total_steps`` is the number of optimizer steps (``trainer.max_steps``).
    """
    s = optim_settings(settings)
    if total_steps <= 0:
        raise ValueError(f"the cosine schedule needs trainer.max_steps > 0, got {total_steps}")
    groups = param_groups(model.named_parameters(), s["weight_decay"])
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters (everything is frozen)")
    opt = torch.optim.AdamW(
        groups, lr=s["lr"], betas=s["betas"], eps=s["eps"], weight_decay=s["weight_decay"]
    )
    floor = s["min_lr"] / s["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(s["warmup_steps"], total_steps, floor))
    return opt, sched
