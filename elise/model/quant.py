"""Low-bit and bf16 weights for CSM inference on CPU (a frame is bound by weight reads).

int8: each projection's weight is stored as int8 with one fp32 scale per output channel (symmetric,
absmax / 127). Single-frame steps (a few rows) run ``torch.ops.aten._weight_int8pack_mm``, which
reads the int8 weight directly; its CPU kernel is fast with bf16 activations (measured on the
AMD EPYC dev box, 2 threads: ~25 GB/s of int8, ~5x the fp32 matrix-vector product), and slow with
fp32 ones, so activations are rounded to bf16 for the product only (the residual stream, norms,
attention and sampling stay fp32). Longer inputs (the prompt prefill, large batches) quantize the
activations too, per row and on the fly, and multiply int8 by int8 with ``torch._int_mm`` (int32
accumulation); no weight is ever dequantized (64 x 1024 x 3072, 1 thread: 9.9 ms against 79 ms for
dequantize + fp32 matmul). What did not help here: torchao int8 weight-only, ``quantize_dynamic``
(fbgemm/onednn/qnnpack: 3-6 GB/s at batch 1).

int4: asymmetric 4-bit weights with one bf16 scale and offset per group of ``INT4_GROUP`` input
channels, through torch's packed int4 kernels (``_weight_int4pack_mm_for_cpu`` on CPU,
``_weight_int4pack_mm`` on CUDA) with bf16 activations (fp32 activations: 27x slower on CPU).
Measured on the AMD EPYC box, 1 thread, 8192 x 1024: 1 row 0.77 ms (fp32 3.8 ms, int8 2.5 ms).

bf16: bf16 weights with bf16 activations for the product (``F.linear``): where the CPU has bf16
matrix units (AMX, avx512_bf16) the multi-row products (prefill, serving batches) run 3-5x fp32.

``quantize(model, "int8" | "int4" | "bf16")`` attaches the replacements as inference-only matmuls
(used when gradients are off); the fp32 parameters, their names and the state_dict are unchanged.
``elise.model.kernels`` times them per machine and picks one (``quantize=auto``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elise.model.csm import CSM

# above this many rows int8 x int8 (``torch._int_mm``) is faster than the int8 matrix-vector kernel
MAX_INT8_ROWS = 16
# int4: input channels sharing one scale and offset (K must be a multiple: every preset's widths are)
INT4_GROUP = 32
# int4 clipping ranges tried per group (fractions of min..max) when refining the scales and offsets
INT4_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# the packed int4 kernels want the output channels in multiples of 16 (zero rows are added, then cut)
INT4_ROWS = 16
MODES = ("int8", "int4", "bf16")  # the ``quantize=`` values besides auto and none


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


def quantize_int4_weight(w: Tensor, group: int = INT4_GROUP, refine: bool = True) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (codes int32 [N, K] in 0..15, scales_and_zeros [K / group, N, 2] fp32) with
    w ~= (codes - 8) * scale + zero per group of ``group`` input channels (torch's int4 convention).

    ``refine``: per group, the clipping range (shrunk from min/max by ``INT4_SHRINKS``) and then the
    scale and offset fitted by least squares to the codes they give (two rounds) that minimise the
    squared error, rounded to bf16 (the kernel's precision) before the final codes; else min/max."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4: {k} input channels are not a multiple of the group size {group}")
    wg = w.detach().float().reshape(n, k // group, group)  # [N, G, group]
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)  # [N, G, 1]
    scale, low = (hi - lo).clamp(min=1e-12) / 15, lo  # w ~= codes * scale + low
    if refine:
        best = torch.full_like(lo, float("inf"))
        mean_w = wg.mean(-1, keepdim=True)
        for shrink in INT4_SHRINKS:
            s, b = (hi - lo).clamp(min=1e-12) * shrink / 15, mean_w + (lo - mean_w) * shrink
            for _ in range(2):  # codes for (s, b), then (s, b) by least squares for those codes
                q = torch.round((wg - b) / s).clamp(0, 15)
                qm = q.mean(-1, keepdim=True)
                var = (q - qm).pow(2).mean(-1, keepdim=True)
                fit = ((q - qm) * (wg - mean_w)).mean(-1, keepdim=True) / var.clamp(min=1e-12)
                s = torch.where(var > 0, fit, s).clamp(min=1e-12)
                b = mean_w - s * qm
            err = (torch.round((wg - b) / s).clamp(0, 15) * s + b - wg).pow(2).sum(-1, keepdim=True)
            better = err < best
            best, scale, low = (
                torch.where(better, err, best),
                torch.where(better, s, scale),
                torch.where(better, b, low),
            )
    scale = scale.to(torch.bfloat16).float()
    zero = (
        (low + 8 * scale).to(torch.bfloat16).float()
    )  # what the kernel adds back: (code - 8) * scale + zero
    codes = torch.round((wg - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
    return codes, torch.cat([scale, zero], -1).transpose(0, 1).contiguous()  # [G, N, 2]


class Int4Matmul:
    """``x @ W.T`` for a group-wise int4 weight W [N, K] (a drop-in for a bias-free Linear); products
    in bf16, returned in ``x``'s dtype."""

    def __init__(self, weights: list[Tensor], group: int = INT4_GROUP):
        w = torch.cat([w.detach() for w in weights])  # [N, K]
        self.n, self.group, self.cuda = w.shape[0], group, w.is_cuda
        pad = -self.n % INT4_ROWS
        codes, sz = quantize_int4_weight(F.pad(w, (0, 0, 0, pad)), group)  # [N', K], [G, N', 2]
        self.scales_zeros = sz.to(torch.bfloat16)
        if self.cuda:  # the CUDA kernel packs two codes per byte first, 8 inner k-tiles
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [M, K]
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(x2, self.packed, self.group, self.scales_zeros)[:, : self.n]  # [M, N]
        return out.to(x.dtype).view(*shape[:-1], -1)


class Bf16Matmul:
    """``x @ W.T`` with a bf16 copy of W [N, K] and bf16 activations (fp32 out for fp32 ``x``)."""

    def __init__(self, weights: list[Tensor]):
        self.w = torch.cat([w.detach() for w in weights]).to(torch.bfloat16).contiguous()  # [N, K]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(torch.bfloat16), self.w).to(x.dtype)


class Fp32Matmul:
    """``x @ W.T`` in fp32: one [K, N] copy for several weights (as ``FusedMatmul``), else ``F.linear``
    on the weight itself (no copy). The fp32 candidate of a per-row-count plan (``RowDispatch``)."""

    def __init__(self, weights: list[Tensor]):
        self.wt = torch.cat([w.detach() for w in weights]).t().contiguous() if len(weights) > 1 else None
        self.w = weights[0].detach()

    def __call__(self, x: Tensor) -> Tensor:
        return x @ self.wt if self.wt is not None else F.linear(x, self.w)


Maker = Callable[[list[Tensor]], Callable[[Tensor], Tensor]]
MATMULS: dict[str, Maker] = {"int8": Int8Matmul, "int4": Int4Matmul, "bf16": Bf16Matmul}
KERNELS: dict[str, Maker] = {"fp32": Fp32Matmul, **MATMULS}  # every candidate of ``quantize=auto``

# int4 keeps the matmuls whose int4 error shows most in the codes at int8: the 31 depth-decoder heads
# and the decoder-input projection (measured on the fitted demo model, each alone in int4: heads
# 99.12 % of the codes equal to fp32, projection 99.50 %, all decoder blocks 99.62 %, backbone and
# codebook-0 head 100 %). They are ~6 % of a marvis_250m frame's weight reads.
SENSITIVE: dict[str, Maker] = {"int4": Int8Matmul}


def kernel(cand: str, sensitive: bool = False) -> Maker:
    """The matmul maker of candidate ``cand`` (``KERNELS``); for a ``sensitive`` weight (depth heads,
    decoder-input projection) its ``SENSITIVE`` replacement where it has one."""
    return SENSITIVE.get(cand, KERNELS[cand]) if sensitive else KERNELS[cand]


# row-count classes of one matmul call (rows = batch x sequence): a batch-1 decode step (1 row; the
# depth decoder's first step has 2), a serving batch (up to 8 items, 16 rows at the decoder's first
# step), a prompt prefill (more)
ROW_CLASSES = (("frame", 2), ("batch8", 16), ("prefill", None))


def row_class(rows: int) -> str:
    """The ``ROW_CLASSES`` name of a call with ``rows`` rows."""
    for name, top in ROW_CLASSES:
        if top is None or rows <= top:
            return name
    raise AssertionError("unreachable: the last class has no bound")


class RowDispatch:
    """One matmul per row-count class (``plan``: class -> candidate), e.g. int4 for the 1-row decode
    steps and bf16 for batches and prefill; each distinct candidate holds its own copy of the weight."""

    def __init__(self, weights: list[Tensor], plan: dict[str, str], sensitive: bool = False):
        makers = {name: kernel(plan[name], sensitive) for name, _ in ROW_CLASSES}
        made = {maker: maker(weights) for maker in dict.fromkeys(makers.values())}  # int4 and int8 share
        self.by_class = {name: made[maker] for name, maker in makers.items()}  # a sensitive weight's int8

    def __call__(self, x: Tensor) -> Tensor:
        return self.by_class[row_class(x.numel() // x.shape[-1])](x)


class Heads:
    """The 31 per-codebook decoder heads [31, Dd, V] as one matmul each on [V, Dd]."""

    def __init__(self, audio_head: Tensor, make: Maker):
        self.heads = [make([audio_head[k].t()]) for k in range(audio_head.shape[0])]

    def __call__(self, x: Tensor, k: int) -> Tensor:
        return self.heads[k](x)  # [B, V]


def quantize(model: CSM, mode: str) -> CSM:
    """``mode`` (int8 / int4 / bf16) matmuls for every projection of both stacks (q/k/v and gate/up
    fused), the decoder-input projection and both heads. Embeddings, norms and RoPE stay fp32. In
    place (replacing earlier ones); returns ``model``. Call after ``.to(device)``; training (gradients
    on) still uses the fp32 weights."""
    if mode not in MATMULS:
        raise ValueError(f"quantize={mode}: not one of {', '.join(MODES)}")
    return attach(model, MATMULS[mode], kernel(mode, sensitive=True))


def quantize_plan(model: CSM, plan: dict[str, str]) -> CSM:
    """Per row-count class candidates (``plan``: every ``ROW_CLASSES`` name -> fp32 / bf16 / int8 /
    int4): one candidate everywhere is ``quantize`` (fp32: the fused fp32 model), several a
    ``RowDispatch`` per matmul. In place; returns ``model``."""
    chosen = set(plan.values())
    if chosen == {"fp32"}:
        return dequantize(model).fuse()
    if len(chosen) == 1:
        return quantize(model, chosen.pop())  # replaces every fused or quantized matmul
    return attach(model, lambda ws: RowDispatch(ws, plan), lambda ws: RowDispatch(ws, plan, sensitive=True))


def attach(model: CSM, make: Maker, make_sensitive: Maker | None = None) -> CSM:
    """``make``'s matmuls for every projection of both stacks and the codebook-0 head, and
    ``make_sensitive``'s (default ``make``) for the decoder-input projection and the 31 depth heads
    (``quantize``)."""
    sensitive = make_sensitive or make
    for stack in (model.backbone, model.decoder):
        for block in stack.blocks():
            attn, mlp = block.self_attn, block.mlp
            attn.fast["qkv"] = make([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            attn.fast["o"] = make([attn.o_proj.weight])
            mlp.fast["gate_up"] = make([mlp.gate_proj.weight, mlp.up_proj.weight])
            mlp.fast["down"] = make([mlp.down_proj.weight])
    model.fast["projection"] = sensitive([model.projection.weight])
    model.fast["codebook0_head"] = make([model.codebook0_head.weight])
    model.fast["audio_head"] = Heads(model.audio_head.detach(), sensitive)
    return model


def quantize_int8(model: CSM) -> CSM:
    """``quantize(model, "int8")``."""
    return quantize(model, "int8")


def dequantize(model: CSM) -> CSM:
    """Drop the low-bit / bf16 replacements and the q/k/v fusion (back to plain fp32 inference; call
    ``model.fuse()`` again for the fused fp32 path). In place; returns ``model``."""
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
