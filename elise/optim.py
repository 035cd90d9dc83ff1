"""AdamW with decay on >=2-D weights only, and a linear-warmup + cosine-to-a-floor schedule.

``optim.impl`` picks torch's AdamW implementation: ``fused`` (one kernel pass over each tensor; CPU
since torch 2.4), ``foreach`` (multi-tensor ops) or ``for_loop`` (one op per tensor per formula term,
torch's CPU default); ``auto`` = fused where every parameter's device has the fused kernel. On a
marvis_250m CPU step the for-loop was a third of the step; fused is ~6x faster (BENCHMARKS.md).

The schedule is a ``LambdaLR`` over a small picklable object (its state is plain numbers, so it
goes into a ``weights_only`` checkpoint) stepped once per optimizer step, after the optimizer
(Lightning's ``interval: step``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from elise.config import conf_defaults

log = logging.getLogger(__name__)

IMPLS = ("auto", "fused", "foreach", "for_loop")


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
    out["impl"] = str(out["impl"])
    if out["impl"] not in IMPLS:
        raise ValueError(f"optim.impl must be one of {', '.join(IMPLS)}, got {out['impl']!r}")
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


def resolve_impl(impl: str, params: Iterable[torch.Tensor], fused_ok: bool = True) -> str:
    """The AdamW implementation ``impl`` stands for with these parameters: ``auto`` = ``fused`` where
    every parameter's device type has torch's fused kernel (and ``fused_ok``: not under a gradient
    scaler with clipping, which Lightning cannot do for an optimizer that unscales inside its step),
    else ``foreach`` where it has the multi-tensor kernels (CUDA), else ``for_loop``. Explicit choices
    are returned as they are; ``fused`` where it cannot run is a one-line ValueError."""
    from torch.optim.optimizer import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    devices = {p.device.type for p in params}
    if impl == "fused" and not (fused_ok and devices <= set(_get_fused_kernels_supported_devices())):
        why = (
            "a gradient scaler (16-mixed) with clipping"
            if fused_ok is False
            else f"devices {sorted(devices)}"
        )
        raise ValueError(f"optim.impl=fused is not possible with {why}: use optim.impl=auto or foreach")
    if impl != "auto":
        return impl
    if fused_ok and devices <= set(_get_fused_kernels_supported_devices()):
        return "fused"
    return "foreach" if devices <= set(_get_foreach_kernels_supported_devices()) else "for_loop"


def impl_flags(impl: str) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments of a resolved implementation."""
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def _keep_impl(flags: dict[str, bool], opt: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Load-state pre-hook: a loaded state dict brings its param groups' fused/foreach flags (an older
    checkpoint: None, the for-loop); the configured implementation wins, the numbers are the same. Set
    before torch loads the state: it places each ``step`` counter by the *saved* groups' flags (on the
    parameter's device for fused), so flags changed afterwards would leave CPU counters for a CUDA fused
    kernel."""
    state_dict = dict(state_dict)
    state_dict["param_groups"] = [{**group, **flags} for group in state_dict["param_groups"]]
    return state_dict


def build_optimizer(
    model: nn.Module, settings: Mapping[str, Any], total_steps: int, fused_ok: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups(model)`` and its warmup + cosine ``LambdaLR``.

    ``total_steps`` is the number of optimizer steps (``trainer.max_steps``); ``fused_ok``: see
    ``resolve_impl``.
    """
    s = optim_settings(settings)
    if total_steps <= 0:
        raise ValueError(f"the cosine schedule needs trainer.max_steps > 0, got {total_steps}")
    groups = param_groups(model.named_parameters(), s["weight_decay"])
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters (everything is frozen)")
    impl = resolve_impl(s["impl"], (p for g in groups for p in g["params"]), fused_ok)
    flags = impl_flags(impl)
    opt = torch.optim.AdamW(
        groups, lr=s["lr"], betas=s["betas"], eps=s["eps"], weight_decay=s["weight_decay"], **flags
    )
    opt.register_load_state_dict_pre_hook(functools.partial(_keep_impl, flags))
    log.info("AdamW implementation: %s (optim.impl=%s)", impl, s["impl"])
    floor = s["min_lr"] / s["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(s["warmup_steps"], total_steps, floor))
    return opt, sched


def schedule_follows_max_steps(checkpoint: dict[str, Any], max_steps: int) -> None:
    """Resuming with another ``trainer.max_steps``: the cosine schedule ends at the new ``max_steps``.

    Called from ``EliseModule.on_load_checkpoint`` (every strategy, FSDP included, before Lightning
    restores the optimizer and scheduler). The checkpoint's scheduler state gets the new end, and its optimizer
    state the learning rate of the next step under it; the log says so with the rates."""
    pairs = zip(checkpoint.get("optimizer_states") or [], checkpoint.get("lr_schedulers") or [], strict=False)
    for opt_state, scheduler in pairs:
        lambdas = scheduler.get("lr_lambdas") or []
        if not lambdas or not all(isinstance(lam, dict) and "total" in lam for lam in lambdas):
            continue  # not elise's WarmupCosine
        old_total = int(lambdas[0]["total"])
        if old_total == max_steps:
            continue
        at = int(scheduler["last_epoch"])  # the next optimizer step's index
        was = [float(group["lr"]) for group in opt_state["param_groups"]]
        for lam in lambdas:
            lam["total"] = max_steps
        lrs = [
            float(b) * WarmupCosine(**lam)(at) for b, lam in zip(scheduler["base_lrs"], lambdas, strict=True)
        ]
        for group, lr in zip(opt_state["param_groups"], lrs, strict=True):
            group["lr"] = lr
        scheduler["_last_lr"] = lrs
        log.info(
            "resuming at step %d with trainer.max_steps=%d: the learning-rate schedule now ends at step %d "
            "(the checkpoint's ended at %d); lr %.3g -> %.3g for the next step",
            at, max_steps, max_steps, old_total, was[0], lrs[0],
        )  # fmt: skip
