"""Int8 weights for CSM inference on CPU (a frame is bound by weight reads).

Each projection's weight is stored as int8 with one fp32 scale per output channel (symmetric,
absmax / 127). Single-frame steps (a few rows) run ``torch.ops.aten._weight_int8pack_mm``, which
reads the int8 weight directly; its CPU kernel is fast with bf16 activations (measured on the
AMD EPYC dev box, 2 threads: ~25 GB/s of int8, ~5x the fp32 matrix-vector product), and slow with
fp32 ones, so activations are rounded to bf16 for the product only (the residual stream, norms,
attention and sampling stay fp32). Longer inputs (the prompt prefill, large batches) quantize the
activations too, per row and on the fly, and multiply int8 by int8 with ``torch._int_mm`` (int32
accumulation); no weight is ever dequantized (64 x 1024 x 3072, 1 thread: 9.9 ms against 79 ms for
dequantize + fp32 matmul). What did not help here: torchao int8 weight-only, ``quantize_dynamic``
(fbgemm/onednn/qnnpack: 3-6 GB/s at batch 1), ``_weight_int4pack_mm_for_cpu``.

``quantize_int8(model)`` attaches the int8 matmuls as inference-only replacements (used when
gradients are off); the fp32 parameters, their names and the state_dict are left unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from elise.model.csm import CSM

# above this many rows int8 x int8 (``torch._int_mm``) is faster than the int8 matrix-vector kernel
MAX_INT8_ROWS = 16


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (int8 [N, K], scales [N]) with w ~= int8 * scales[:, None]."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q.contiguous(), scales


class Int8Matmul:
    """``x @ W.T`` for an int8 weight W [N, K] with per-row scales (a drop-in for a bias-free Linear)."""

    def __init__(self, weights: list[Tensor]):
        self.q, self.scales = quantize_weight(torch.cat([w.detach() for w in weights]))  # [N, K], [N]
        self.scales_bf16 = self.scales.to(torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if x2.shape[0] > MAX_INT8_ROWS:
            out = int8_activation_mm(x2, self.q, self.scales).to(x.dtype)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scales_bf16).to(
                x.dtype
            )
        return out.view(*shape[:-1], -1)  # [..., N]


def int8_activation_mm(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] float @ (q [N, K] int8 * scales [N]).T with x quantized per row (absmax / 127): one
    int8 x int8 -> int32 product, rescaled in fp32 -> [M, N] fp32."""
    x = x.float()
    x_scales = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # [M, 1]
    xq = torch.round(x / x_scales).clamp(-127, 127).to(torch.int8)  # [M, K]
    return torch._int_mm(xq, q.t()).float() * x_scales * scales  # [M, N]


class Int8Heads:
    """The 31 per-codebook decoder heads [31, Dd, V] as int8 matrices [V, Dd] (scales per code id)."""

    def __init__(self, audio_head: Tensor):
        self.heads = [Int8Matmul([audio_head[k].t()]) for k in range(audio_head.shape[0])]

    def __call__(self, x: Tensor, k: int) -> Tensor:
        return self.heads[k](x)  # [B, V]


def quantize_int8(model: CSM) -> CSM:
    """Int8 weight-only matmuls for every projection of both stacks (q/k/v and gate/up fused), the
    decoder-input projection and both heads. Embeddings, norms and RoPE stay fp32. In place; returns
    ``model``. Call after ``.to(device)``; training (gradients on) still uses the fp32 weights."""
    for stack in (model.backbone, model.decoder):
        for block in stack.blocks():
            attn, mlp = block.self_attn, block.mlp
            attn.fast["qkv"] = Int8Matmul([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            attn.fast["o"] = Int8Matmul([attn.o_proj.weight])
            mlp.fast["gate_up"] = Int8Matmul([mlp.gate_proj.weight, mlp.up_proj.weight])
            mlp.fast["down"] = Int8Matmul([mlp.down_proj.weight])
    model.fast["projection"] = Int8Matmul([model.projection.weight])
    model.fast["codebook0_head"] = Int8Matmul([model.codebook0_head.weight])
    model.fast["audio_head"] = Int8Heads(model.audio_head.detach())
    return model


def dequantize(model: CSM) -> CSM:
    """Drop the int8 replacements (back to fp32 inference). In place; returns ``model``."""
    modules: list[nn.Module] = [model]
    for stack in (model.backbone, model.decoder):
        for block in stack.blocks():
            modules += [block.self_attn, block.mlp]
    for m in modules:
        m.__dict__["fast"] = {}
    return model


def int8_weight_bytes(model: CSM) -> int:
    """Bytes of int8 weights ``quantize_int8`` creates (the scales excluded)."""
    n = sum(p.numel() for p in model.backbone.parameters() if p.dim() == 2)
    n += sum(p.numel() for p in model.decoder.parameters() if p.dim() == 2)
    return (
        n + model.projection.weight.numel() + model.codebook0_head.weight.numel() + model.audio_head.numel()
    )
