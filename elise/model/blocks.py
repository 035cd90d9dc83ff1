"""Llama-3.2-style transformer stack: RMSNorm, RoPE with llama3 scaling, GQA through SDPA, SwiGLU.

Module names follow transformers' Llama/CSM layout (``layers.{i}.self_attn.q_proj`` ...) so that
weights map one to one. The rotation is the "rotate half" convention transformers uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elise.model.config import TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 (as transformers does), scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, float] | None) -> Tensor:
    """Inverse frequencies [head_dim // 2], with llama3 frequency scaling when ``scaling`` is given."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated key/value cache for every layer of one stack: [layers, B, kv_heads, max_len, head_dim].

    ``pos`` is the number of positions already written; the stack advances it after each forward.
    """

    def __init__(self, cfg: TransformerConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class FusedMatmul:
    """``x @ wt`` with a [K, N] weight: the fused q/k/v (or gate/up) projection for inference.

    Not an nn.Module (so it adds nothing to the state_dict); the separate projections' weights are
    re-pointed at column blocks of ``wt``, so fusing costs no memory and they stay in sync. The
    [K, N] layout is also the faster one for wide matrix-vector products with MKL on CPU.
    """

    def __init__(self, linears: list[nn.Linear]):
        self.wt = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous()  # [K, sum N]
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = self.wt[:, start : start + n].t()  # a view: same storage
            start += n

    def __call__(self, x: Tensor) -> Tensor:
        return x @ self.wt


def fast_path(module: nn.Module, name: str) -> Callable[..., Tensor] | None:
    """The inference-only replacement ``name`` (fused or int8 matmul) when gradients are off, else None."""
    fast: dict[str, Callable[..., Tensor]] | None = module.__dict__.get("fast")
    if not fast or torch.is_grad_enabled():
        return None
    return fast.get(name)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        # inference-only matmuls (set by Transformer.fuse / elise.model.quant): "qkv", "o"
        self.fast: dict[str, Callable[[Tensor], Tensor]] = {}

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, D] -> q [B, S, H*hd], k, v [B, S, KV*hd] (one matmul when fused)."""
        qkv = fast_path(self, "qkv")
        if qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv(x).split((nq, nkv, nkv), dim=-1)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        layer: int = 0,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, S, hd]
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, S, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, KV, pos+S, hd]
        # causal when queries and keys start together and no explicit mask is given
        causal = attn_mask is None and s > 1 and k.shape[2] == s
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.num_heads != self.num_kv_heads
        )  # [B, H, S, hd]
        o = o.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [B, S, H*hd]
        return (fast_path(self, "o") or self.o_proj)(o)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.fast: dict[str, Callable[[Tensor], Tensor]] = {}  # inference-only: "gate_up", "down"

    def forward(self, x: Tensor) -> Tensor:
        gate_up = fast_path(self, "gate_up")
        if gate_up is None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [B, S, hidden]
        else:
            g, u = gate_up(x).chunk(2, dim=-1)
            h = F.silu(g) * u
        return (fast_path(self, "down") or self.down_proj)(h)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, cache, attn_mask) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A stack of blocks + final RMSNorm, over input embeddings [B, S, dim] -> hidden [B, S, dim]."""

    # buffers made by register_buffer (declared so type checkers see Tensors, not Tensor | Module)
    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)  # [T, hd/2]
        angles = torch.cat((angles, angles), dim=-1)  # [T, hd]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def blocks(self) -> Iterator[Block]:
        """The blocks of ``layers``, typed (nn.ModuleList yields plain Modules)."""
        return (cast(Block, block) for block in self.layers)

    def fuse(self) -> Transformer:
        """Fuse q/k/v and gate/up into one [K, N] matmul each for inference (used only when gradients
        are off; weights, state_dict names and training are unchanged). Call after ``.to(device)``."""
        for block in self.blocks():
            attn, mlp = block.self_attn, block.mlp
            if "qkv" not in attn.fast:
                attn.fast["qkv"] = FusedMatmul([attn.q_proj, attn.k_proj, attn.v_proj])
            if "gate_up" not in mlp.fast:
                mlp.fast["gate_up"] = FusedMatmul([mlp.gate_proj, mlp.up_proj])
        return self

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(self.cfg, batch_size, min(max_len, self.cfg.max_seq_len), dtype, device)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, S, dim]; positions [S] or [B, S] (default: cache.pos + arange(S)); attn_mask bool
        [B, 1, S, keys] (True = attend) when needed (padding in batched generation)."""
        s = x.shape[1]
        if positions is None:  # contiguous positions: a view of the tables, no gather
            start = cache.pos if cache is not None else 0
            cos, sin = self.rope_cos[start : start + s], self.rope_sin[start : start + s]  # [S, hd]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [S, hd] or [B, S, hd]
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if cos.dim() == 3:  # per-item positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, i, cache, attn_mask)
        if cache is not None:
            cache.pos += s
        return self.norm(x)
