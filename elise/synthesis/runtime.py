"""Loading for synthesis: device and dtype, the model (+ int8 / int4 / bf16 matmuls, torch.compile), the codec."""

from __future__ import annotations

import logging
from typing import Any

import torch

from elise.checkpoints import Loaded, load_model
from elise.codec import Codec, build_codec, check_codec
from elise.model.csm import CSM
from elise.model.kernels import choose_kernels
from elise.model.quant import MODES
from elise.model.quant import quantize as apply_quantize
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
    """``auto`` -> bf16 on a GPU that supports it, fp32 otherwise (on a CPU the model stays fp32: bf16
    matmuls are one of ``quantize=auto``'s candidates, kept where the machine runs them faster)."""
    name = str(name or "auto")
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise SynthesisError(f"dtype={name} is not supported; use auto, float32 or bfloat16")
    return DTYPES[name]


def prepare_model(model: CSM, dtype: torch.dtype, quantize: str | None = None, compile: bool = False) -> CSM:
    """Cast, fuse q/k/v and gate/up, then the matmuls ``quantize`` names: none (or null), int8, int4,
    bf16, or auto (CPU: the fastest of fp32/bf16/int8/int4 on this machine that agrees with fp32,
    ``elise.model.kernels``; GPU: none). Optionally torch.compile."""
    mode = "none" if quantize is None else str(quantize)
    if mode not in ("none", "auto", *MODES):
        raise SynthesisError(f"quantize={quantize} is not supported; use auto, none, {', '.join(MODES)}")
    model = model.to(dtype).eval().requires_grad_(False).fuse()
    device = next(model.parameters()).device
    if mode == "auto" and device.type == "cuda":
        log.info("quantize=auto on a GPU: %s weights, no quantization", dtype)
    elif mode == "auto":
        choose_kernels(model)
    elif mode != "none":
        try:
            apply_quantize(model, mode)
        except (RuntimeError, ValueError) as err:
            raise SynthesisError(f"quantize={mode}: {one_line(err)}") from err
        log.info("quantize=%s: %s matmuls for both stacks, the projection and the heads", mode, mode)
    if compile:
        if device.type == "cpu":
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
