"""A tiny Mimi-shaped codec with seeded random weights: same shapes and rates as Mimi, fast on CPU.

Each 1920-sample frame is projected to a small latent (dim 16), normalised to unit RMS (so codes
do not depend on loudness and every codebook level sees residuals of a known scale), and quantized
by a 32-level residual VQ with 2048 entries per level. Decoding sums the chosen codebook vectors and
projects back to 1920 samples. It exists so tests and demos exercise the whole pipeline in
milliseconds; its audio is not speech.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elise.codec.base import Codec
from elise.codec.common import check_codes, check_wav, frames_from_lengths, pad_to_frames


class TinyCodec(Codec):
    """Seeded random residual-VQ codec of Mimi's shapes ([B, 32, T] codes < 2048, 1920 samples/frame).

    Args:
        seed: weights are drawn from ``torch.Generator().manual_seed(seed)``: same seed, same codes,
            in any process.
        dim: latent and codebook dimension.
        decay: ratio of the codebook scale of level k+1 to level k (residuals shrink level by level).
        num_codebooks: codebooks per frame (32 like Mimi).
        batch_size, device: accepted so every codec takes the same config keys; tiny runs in one go.
    """

    random_weights = True
    # buffers made by register_buffer (declared so type checkers see Tensors, not Tensor | Module)
    proj: Tensor  # [1920, D]
    codebooks: Tensor  # [K, 2048, D]

    def __init__(
        self,
        seed: int = 0,
        dim: int = 16,
        decay: float = 0.8,
        num_codebooks: int = 32,
        batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        if dim < 1 or not 1 <= num_codebooks <= 32 or not 0.0 < decay <= 1.0:
            raise ValueError(
                f"tiny codec: bad settings dim={dim} num_codebooks={num_codebooks} decay={decay}"
            )
        self.seed, self.dim, self.decay, self.num_codebooks = int(seed), int(dim), float(decay), num_codebooks
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(self.seed)
        n = self.samples_per_frame
        # ~orthonormal columns: x @ proj keeps the per-sample scale; proj.T maps latents back to audio
        proj = torch.randn(n, self.dim, generator=gen) / n**0.5  # [1920, D]
        scales = self.decay ** torch.arange(num_codebooks, dtype=torch.float32)  # [K]
        books = torch.randn(num_codebooks, self.cardinality, self.dim, generator=gen)  # [K, 2048, D]
        self.register_buffer("proj", proj)
        self.register_buffer("codebooks", books * scales[:, None, None])  # [K, 2048, D]
        self.to(device)
        self.eval()

    @property
    def identity(self) -> str:
        # v1: bump when the recipe changes so cached codes of the old recipe are not reused
        return (
            f"tiny(v1,seed={self.seed},dim={self.dim},decay={self.decay},nq={self.num_codebooks},bins=2048)"
        )

    @torch.no_grad()
    def encode(self, wav: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_wav(wav)
        b, _, n = wav.shape
        frames = frames_from_lengths(lengths, b, n, self.samples_per_frame)  # [B]
        x = pad_to_frames(wav.to(self.proj), self.samples_per_frame)  # [B, 1, T * 1920]
        x = x.reshape(b, x.shape[-1] // self.samples_per_frame, self.samples_per_frame)  # [B, T, 1920]
        z = x @ self.proj  # [B, T, D]
        z = z / z.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)  # [B, T, D], unit RMS per frame
        codes = []
        for book in self.codebooks:  # book: [2048, D]
            idx = torch.cdist(z, book[None].expand(b, -1, -1)).argmin(-1)  # [B, T]
            z = z - book[idx]  # [B, T, D] residual for the next level
            codes.append(idx)
        return torch.stack(codes, 1).to(wav.device), frames.to(wav.device)  # [B, K, T], [B]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        check_codes(codes, self.num_codebooks, self.cardinality)
        codes = codes.to(self.proj.device)
        b, k, t = codes.shape
        level = torch.arange(k, device=codes.device)[None, :, None]  # [1, K, 1]
        z = self.codebooks[level, codes].sum(1)  # [B, T, D]
        # 0.1: unit-RMS latents back to a speech-like level (the projection keeps per-sample scale)
        x = 0.1 * z @ self.proj.T  # [B, T, 1920]
        return x.reshape(b, 1, t * self.samples_per_frame)  # [B, 1, T * 1920]
