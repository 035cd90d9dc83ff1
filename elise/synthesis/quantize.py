"""Weight-only int8 quantization of the transformer blocks' Linear layers (``quantize=int8``).

Each output channel keeps an fp scale (absmax / 127) and int8 weights: 4x less weight memory than
fp32. The matmul either uses torch's CPU kernel ``aten._weight_int8pack_mm`` or casts the int8
weights to the activation dtype and scales the output (gpt-fast's form, which torch.compile fuses
into one kernel on GPU). Embeddings and heads stay in full precision (the heads pick the codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNELS = ("auto", "pack", "dequant")


def has_pack_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights [out, in] and per-output-channel scales [out].

    Args:
        kernel: ``pack`` (``aten._weight_int8pack_mm``, CPU only), ``dequant`` (cast + matmul + scale),
            or ``auto``: pack on CPU when torch has it (2-5x faster than casting the weights every call
            there), dequant elsewhere (on GPU torch.compile fuses the cast into the matmul).
    """

    def __init__(self, weight: Tensor, scales: Tensor, kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8))  # [out, in]
        self.register_buffer("scales", scales.float())  # [out]
        self.kernel = kernel
        self.pack = kernel == "pack" or (kernel == "auto" and has_pack_kernel())  # used on CPU inputs

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free Linear layers only (the Llama blocks have none)")
        w = linear.weight.detach().float()  # [out, in]
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127)  # [out, in]
        return cls(q.to(linear.weight.device), scales.to(linear.weight.device), kernel)

    def forward(self, x: Tensor) -> Tensor:
        if self.pack and x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).contiguous()  # [M, in]
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))  # [M, out]
            return y.view(*x.shape[:-1], self.out_features)
        # per-output-channel scale commutes with the matmul: (x W^T) * s == x (W * s)^T
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # [..., out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def quantize_int8(model: nn.Module, kernel: str = "auto") -> int:
    """Replace every nn.Linear inside ``model.backbone`` and ``model.decoder`` by an Int8Linear, in place.

    Returns the number of layers replaced.
    """
    if kernel == "pack" and not has_pack_kernel():
        raise ValueError("this torch has no aten._weight_int8pack_mm; use quantize_kernel=dequant")
    count = 0
    for stack in (model.backbone, model.decoder):
        for parent in list(stack.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child, kernel))
                    count += 1
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (to show what quantization saves)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
