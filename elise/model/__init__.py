"""The model: Llama blocks, backbone + depth decoder, presets, loss."""

from __future__ import annotations

from typing import Any

from elise.model.config import CSMConfig, TransformerConfig
from elise.model.csm import CSM
from elise.model.presets import PRESETS, preset


def build_model(cfg: CSMConfig | dict[str, Any] | str) -> CSM:
    """A CSM from a preset name, a CSMConfig, or its dict (the Hydra ``model`` group / checkpoint hparams)."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    elif isinstance(cfg, dict):
        cfg = CSMConfig.from_dict(cfg)
    return CSM(cfg)


__all__ = ["CSM", "CSMConfig", "TransformerConfig", "PRESETS", "preset", "build_model"]
