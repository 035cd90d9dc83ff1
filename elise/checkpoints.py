"""The one checkpoint loader: an elise Lightning ``.ckpt`` or a transformers "csm" directory.

Checkpoints are read with ``torch.load(weights_only=True)`` (or safetensors): no pickled code is
ever executed. An elise checkpoint holds, besides Lightning's own keys:

- ``hyper_parameters["model"]``: the CSMConfig as a dict of primitives (rebuilds the network);
- ``hyper_parameters["tokenizer"]``: ``"bytes"`` or the HF tokenizer spec it was trained with;
- ``elise_tokenizer_json`` (optional): the full ``tokenizer.json`` text of an HF tokenizer;
- ``state_dict``: the LightningModule's, with the CSM under the ``model.`` prefix.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from elise.model import CSM, build_model
from elise.text import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

MODEL_PREFIX = "model."


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not an elise/transformers checkpoint (one-line message)."""


@dataclass
class Loaded:
    model: CSM
    tokenizer: Tokenizer
    source: str  # "elise" | "transformers"
    meta: dict[str, Any] = field(default_factory=dict)
    # The codec the model was trained on: {"name", "config", "weights_sha256"}; None when not recorded.
    codec: dict[str, Any] | None = None
    speakers: dict[str, int] = field(default_factory=dict)  # speaker name -> id, as trained


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for the usual failures."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without config.json + model.safetensors")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds code or objects that are not plain data ({first})"
        ) from e
    except Exception as e:  # torch raises many types for truncated/garbage files (EOFError, KeyError, ...)
        raise CheckpointError(
            f"unreadable checkpoint {path} (truncated or not a checkpoint): {type(e).__name__}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an elise checkpoint (no state_dict)")
    return ckpt


def tokenizer_from_checkpoint(ckpt: dict[str, Any]) -> Tokenizer:
    if ckpt.get("elise_tokenizer_json"):
        return HFTokenizer.from_json(ckpt["elise_tokenizer_json"])
    spec = ckpt.get("hyper_parameters", {}).get("tokenizer", "bytes")
    return build_tokenizer(spec)


def load_elise_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp:
        raise CheckpointError(f"{path} has no model config in hyper_parameters: not an elise checkpoint")
    model = build_model(dict(hp["model"]))
    state = {k[len(MODEL_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    meta = {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), "hyper_parameters": hp}
    return Loaded(model.to(map_location).eval(), tokenizer_from_checkpoint(ckpt), "elise", meta)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    """Load an elise ``.ckpt`` file or a transformers "csm" directory (config.json + model.safetensors)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        from elise.interop import load_transformers_dir

        return load_transformers_dir(path, map_location)
    return load_elise_checkpoint(path, map_location)


__all__ = ["CheckpointError", "Loaded", "load_model", "read_checkpoint", "ByteTokenizer"]
