"""Llama-3.2-style transformer stack: RMSNorm, RoPE with llama3 scaling, GQA through SDPA, SwiGLU.

Module names follow transformers' Llama/CSM layout (``layers.{i}.self_attn.q_proj`` ...) so that
weights map one to one. The rotation is the "rotate half" convention transformers uses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elise.model.config import TransformerConfig

# compiled (static-shape) steps: inputs of at most this many rows (a decode step: 1, the decoder's first: 2)
MAX_COMPILED_ROWS = 2
# ... and cache lengths rounded up to a multiple of this
CACHE_BUCKET = 256


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

    Slot j holds the keys/values of the j-th row fed to the stack; ``pos`` is the number of slots
    written (the stack advances it after each forward).
    """

    def __init__(self, cfg: TransformerConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) of this one, at position 0 (views: writes land here)."""
        view = copy.copy(self)
        view.k, view.v, view.pos = self.k[:, start:stop], self.v[:, start:stop], 0
        return view

    def next_slots(self, s: int) -> Tensor:
        """The slots [s] the next ``s`` rows are written to."""
        end = self.pos + s
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > {self.max_len}")
        return torch.arange(self.pos, end, device=self.k.device)


def cache_mask(slots: Tensor, max_len: int, attn_mask: Tensor | None) -> Tensor:
    """Bool mask [B or 1, 1, S, max_len] over every cache slot: query row i (written to ``slots[i]``)
    sees slot j iff j <= slots[i] (causal at any cache position, for chunks of any length; later slots
    are not written yet) and ``attn_mask`` (a caller's [B, 1, S, max_len] mask, e.g. padding) allows it."""
    causal = torch.arange(max_len, device=slots.device)[None, :] <= slots[:, None]  # [S, max_len]
    if attn_mask is None:
        return causal[None, None]
    if attn_mask.dim() != 4 or attn_mask.shape[2:] != causal.shape:
        raise ValueError(
            f"with a KV cache, attn_mask must be [B, 1, S, max_len] = [B, 1, {slots.shape[0]}, {max_len}], "
            f"got {list(attn_mask.shape)}"
        )
    return attn_mask & causal


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
        kv: tuple[Tensor, Tensor] | None = None,
        slots: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, S, D]. Without ``kv``: causal self-attention (or ``attn_mask`` [B, 1, S, S], True =
        attend). With ``kv`` (this layer's cache [B, KV, keys, hd] each): the new keys/values are written
        to ``slots`` [S] (or per row [B, S]) and the queries attend to every slot under ``attn_mask``
        [B or 1, 1, S, keys]."""
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, S, hd]
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, S, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            assert slots is not None, "a cached attention needs the slots it writes"
            if slots.dim() == 2:  # per-row slots [B, S]: each row at its own cache position (serving)
                rows = torch.arange(b, device=slots.device)[:, None]  # [B, 1]
                kv[0][rows, :, slots] = k.transpose(1, 2)  # [B, S, KV, hd]
                kv[1][rows, :, slots] = v.transpose(1, 2)
            else:
                kv[0].index_copy_(2, slots, k)
                kv[1].index_copy_(2, slots, v)
            k, v = kv  # [B, KV, keys, hd]
        # no shape-dependent flag: is_causal only for the uncached, unmasked (training) pass; a cached
        # pass without a mask sees every key it is given (one row after the written slots)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=kv is None and attn_mask is None,
            enable_gqa=self.num_heads != self.num_kv_heads,
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

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        slots: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, slots, attn_mask)
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
        self.compiled_step: Callable[..., Tensor] | None = None  # set by compile_step

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
        if self.compiled_step is not None:
            # compiled steps have static shapes: round the length up so requests share a few graphs
            max_len = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        cache = KVCache(self.cfg, batch_size, min(max_len, self.cfg.max_seq_len), dtype, device)
        if self.compiled_step is not None:  # CUDA graphs update the cache in place at a fixed address
            torch._dynamo.mark_static_address(cache.k, guard=False)
            torch._dynamo.mark_static_address(cache.v, guard=False)
        return cache

    def compile_step(self, backend: str = "inductor", mode: str | None = None) -> Transformer:
        """Compile the cached step of one or two rows (a decode step) into one graph with static shapes:
        the cache, slots, RoPE angles and mask enter as tensors, so nothing guards on a Python int
        (cache position, layer index). ``mode`` defaults to CUDA graphs (``reduce-overhead``) on a GPU.
        Longer inputs (prompt prefill) stay eager."""
        if mode is None and backend == "inductor" and self.rope_cos.is_cuda:
            mode = "reduce-overhead"
        self.compiled_step = torch.compile(
            self.step, backend=backend, mode=mode, fullgraph=True, dynamic=False
        )
        return self

    def rope(self, positions: Tensor | None, start: int, s: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [S, hd] (or [B, 1, S, hd] for per-item ``positions`` [B, S]); default positions
        start + arange(S)."""
        if positions is None:  # contiguous positions: a view of the tables, no gather
            cos, sin = self.rope_cos[start : start + s], self.rope_sin[start : start + s]  # [S, hd]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [S, hd] or [B, S, hd]
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        if cos.dim() == 3:  # per-item positions: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, slots: Tensor, mask: Tensor | None
    ) -> Tensor:
        """The cached pass over tensors only: x [B, S, dim]; k, v [layers, B, KV, keys, hd] (written at
        ``slots`` [S] or [B, S]); mask bool [B or 1, 1, S, keys] (None: every key) -> hidden [B, S, dim]."""
        for block, k_layer, v_layer in zip(self.blocks(), k.unbind(0), v.unbind(0), strict=True):
            x = block(x, cos, sin, (k_layer, v_layer), slots, mask)
        return self.norm(x)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x [B, S, dim]; positions [S] or [B, S] (default: cache.pos + arange(S)). attn_mask bool, True =
        attend: [B, 1, S, S] without a cache; with a cache [B, 1, S, cache.max_len] over every cache
        slot (e.g. hiding left padding), combined with causality at the cache position."""
        s = x.shape[1]
        cos, sin = self.rope(positions, cache.pos if cache is not None else 0, s, x.dtype)
        if cache is None:
            for block in self.blocks():
                x = block(x, cos, sin, None, None, attn_mask)
            return self.norm(x)
        slots = cache.next_slots(s)  # [S]
        end = cache.pos + s
        if self.compiled_step is not None and s <= MAX_COMPILED_ROWS:
            # every slot (static shapes); a copy: CUDA graphs reuse their output buffer
            mask = cache_mask(slots, cache.max_len, attn_mask)  # [B or 1, 1, S, max_len]
            h = self.compiled_step(x, cos, sin, cache.k, cache.v, slots, mask).clone()
        else:  # eager: only the slots written so far
            # one unmasked row sees every written slot: no mask to build (the depth decoder's 31 steps)
            keys = (
                None
                if s == 1 and attn_mask is None
                else cache_mask(slots, cache.max_len, attn_mask)[..., :end]
            )
            h = self.step(x, cos, sin, cache.k[..., :end, :], cache.v[..., :end, :], slots, keys)
        cache.pos += s
        return h
