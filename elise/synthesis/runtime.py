"""Loading for synthesis: device and dtype, the model (+ int8 / torch.compile), the codec."""

from __future__ import annotations

import logging
from typing import Any

import torch

from elise.checkpoints import Loaded, load_model
from elise.codec import Codec, build_codec, check_codec
from elise.model.csm import CSM
from elise.model.quant import quantize_int8
from elise.synthesis.errors import SynthesisError, one_line

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise SynthesisError(f"device={name} is not a device (use auto, cpu or cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SynthesisError("device=cuda but no CUDA GPU is available here; use device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a GPU that supports it, fp32 otherwise (CPUs here have no fast bf16)."""
    name = str(name or "auto")
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise SynthesisError(f"dtype={name} is not supported; use auto, float32 or bfloat16")
    return DTYPES[name]


def prepare_model(model: CSM, dtype: torch.dtype, quantize: str | None = None, compile: bool = False) -> CSM:
    """Cast, fuse q/k/v and gate/up, optionally int8 weights (``quantize=int8``), optionally torch.compile."""
    model = model.to(dtype).eval().requires_grad_(False).fuse()
    if quantize:
        if str(quantize) != "int8":
            raise SynthesisError(f"quantize={quantize} is not supported; use quantize=int8 or leave it null")
        quantize_int8(model)
        log.info("quantize=int8: int8 weight-only matmuls for both stacks, the projection and the heads")
    if compile:
        if next(model.parameters()).device.type == "cpu":
            log.warning("compile=true on CPU: the first frames wait for torch.compile (a minute or more)")
        model.compile_steps()
        log.info(
            "compile=true: backbone and decoder decode steps compiled (static shapes; first frames compile)"
        )
    return model


def load(ckpt: str, device: torch.device, base: str | None = None) -> Loaded:
    """The model of ``ckpt``; a LoRA checkpoint comes merged into its base (``base``, else the recorded
    one), so ``prepare_model``'s fused and int8 matmuls carry the adapters."""
    if not ckpt:
        raise SynthesisError("no checkpoint: pass ckpt=<file.ckpt or transformers directory>")
    return load_model(str(ckpt), map_location=device, base=base or None)


def resolve_codec(
    requested: dict[str, Any] | str | None, recorded: dict[str, Any] | None
) -> tuple[dict[str, Any], str | None]:
    """(``build_codec`` options, one warning line or None) for a model trained on codec ``recorded``.

    ``requested`` None: the recorded codec with its recorded settings (``elise.codec.check_codec``
    decides the name and the warning).
    """
    if isinstance(requested, str):
        requested = {"name": requested}
    name, warning = check_codec(recorded, None if requested is None else str(requested.get("name")))
    if requested is not None:
        return dict(requested), warning
    config = dict((recorded or {}).get("config") or {}) if recorded and recorded.get("name") == name else {}
    return {**{k: v for k, v in config.items() if k != "name"}, "name": name}, warning


def load_codec(
    requested: dict[str, Any] | str | None,
    recorded: dict[str, Any] | None,
    device: torch.device,
    num_codebooks: int,
) -> Codec:
    """Build the codec (None: the one the model was trained on) on ``device``; it must have the model's
    codebook count."""
    kwargs, warning = resolve_codec(requested, recorded)
    if warning:
        log.warning(warning)
    kwargs["device"] = str(device)
    try:
        codec = build_codec(**kwargs)
    except ValueError as err:
        raise SynthesisError(f"codec: {one_line(err)}") from err
    if codec.num_codebooks != num_codebooks:
        raise SynthesisError(
            f"the model predicts {num_codebooks} codebooks but codec {codec.identity} has {codec.num_codebooks}"
        )
    return codec
