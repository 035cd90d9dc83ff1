"""LoRA adapters on the attention and MLP projections of the backbone and/or the depth decoder.

A target projection ``W`` [out, in] becomes ``W x + (alpha / rank) * B A dropout(x)`` with
``A`` [rank, in] (Kaiming-uniform) and ``B`` [out, rank] (zeros: an untrained adapter changes
nothing). Every base weight is frozen; only ``A`` and ``B`` train.

Why a module of ours and not peft (installed): measured here, ``import peft`` costs 2.9 s after
torch + transformers and imports torchao, which prints four lines of warnings on stderr, at every
load of a LoRA checkpoint for synthesis; peft also renames the base weights
(``q_proj.base_layer.weight``), so a base checkpoint no longer loads by name. ``LoRALinear`` is an
``nn.Linear`` that keeps the base ``weight`` under its own name, so base weights load and compare
as they are, and the adapters add two keys per projection (``lora_A``, ``lora_B``).

Inference: the fused (``Transformer.fuse``) and int8 (``elise.model.quant``) fast paths read the
projections' ``weight`` only, so adapters must be merged first: ``merge_lora`` folds ``B A`` into
a new weight and puts plain ``nn.Linear`` modules back (``elise.checkpoints.load_model`` does it
for every LoRA checkpoint, before synthesis fuses or quantizes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elise.model.csm import CSM

STACKS = ("backbone", "decoder")
GROUPS = {
    "attn": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mlp": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
PROJECTIONS = {proj: group for group, (_, projs) in GROUPS.items() for proj in projs}


@dataclass
class LoRAConfig:
    """Args:
    rank: width r of the low-rank update.
    alpha: the update is scaled by alpha / rank.
    dropout: dropout on the adapter's input (training only).
    targets: ``<stack>.<part>``: stack ``backbone`` or ``decoder``; part ``attn`` (q/k/v/o), ``mlp``
        (gate/up/down) or one projection (``q_proj`` ... ``down_proj``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("backbone.attn", "backbone.mlp", "decoder.attn", "decoder.mlp")

    def __post_init__(self) -> None:
        self.rank, self.alpha, self.dropout = int(self.rank), float(self.alpha), float(self.dropout)
        self.targets = tuple(str(t) for t in self.targets)
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one of backbone.attn, decoder.mlp, ...")
        target_projections(self.targets)  # validates the names

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRAConfig:
        return cls(**{k: v for k, v in dict(d).items() if k in ("rank", "alpha", "dropout", "targets")})


def target_projections(targets: Iterable[str]) -> list[tuple[str, str, str]]:
    """(stack, block child, projection) for every target, in model order, without duplicates."""
    chosen = set()
    for target in targets:
        stack, _, part = str(target).partition(".")
        if stack not in STACKS or (part not in GROUPS and part not in PROJECTIONS):
            raise ValueError(
                f"lora.targets: {target!r} is not <stack>.<part> with stack backbone|decoder and part "
                f"attn|mlp|{'|'.join(PROJECTIONS)}"
            )
        projs = GROUPS[part][1] if part in GROUPS else (part,)
        chosen |= {(stack, p) for p in projs}
    return [
        (stack, child, proj)
        for stack in STACKS
        for child, projs in GROUPS.values()
        for proj in projs
        if (stack, proj) in chosen
    ]


class LoRALinear(nn.Linear):
    """A bias-free ``nn.Linear`` (the base ``weight``, frozen) plus a rank-r update ``B A``."""

    lora_A: nn.Parameter  # [r, in]
    lora_B: nn.Parameter  # [out, r]
    scaling: float
    dropout: nn.Module

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # the base weight is shared, not allocated again
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free projections only")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        low = F.linear(self.dropout(x), self.lora_A)  # [..., r]
        return F.linear(x, self.weight) + F.linear(low, self.lora_B) * self.scaling  # [..., out]

    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A [out, in], computed in fp32."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def add_lora(model: CSM, cfg: LoRAConfig) -> CSM:
    """Freeze every weight of ``model`` and wrap the target projections in ``LoRALinear``. In place."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("the model already has LoRA adapters (merge_lora first)")
    model.requires_grad_(False)
    for stack, child, proj in target_projections(cfg.targets):
        for block in getattr(model, stack).blocks():
            parent = getattr(block, child)
            setattr(parent, proj, LoRALinear(getattr(parent, proj), cfg.rank, cfg.alpha, cfg.dropout))
    return model


def merge_lora(model: CSM) -> CSM:
    """Fold every adapter into its weight (a new tensor: the base tensors are not written) and put plain
    ``nn.Linear`` modules back, ready for ``fuse``/``quantize_int8``. In place; returns ``model``."""
    for name, layer in list(lora_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        plain = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(layer.merged_weight().detach(), requires_grad=False)
        setattr(model.get_submodule(parent_name), attr, plain)
    return model


def lora_state_dict(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The adapters' tensors only (``<prefix><module>.lora_A`` / ``lora_B``)."""
    return {k: v for k, v in model.state_dict(prefix=prefix).items() if is_lora_key(k)}


def is_lora_key(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def num_lora_params(model: CSM, cfg: LoRAConfig) -> int:
    """Adapter parameters ``add_lora(model, cfg)`` adds: rank * (in + out) per target projection."""
    total = 0
    for stack, child, proj in target_projections(cfg.targets):
        for block in getattr(model, stack).blocks():
            lin = getattr(getattr(block, child), proj)
            total += cfg.rank * (lin.in_features + lin.out_features)
    return total
