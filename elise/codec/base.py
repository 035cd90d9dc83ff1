"""The one codec interface: waveforms at 24 kHz <-> [B, 32, T] integer codes at 12.5 Hz."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class CodecUnavailable(RuntimeError):
    """The codec's weights cannot be had (offline, no access, missing or corrupt file)."""


class Codec(nn.Module, ABC):
    """Mimi-shaped audio codec.

    ``encode`` takes a batch of mono waveforms [B, 1, N] (right-padded) with their lengths in
    samples and returns codes [B, 32, T] (long, values < ``cardinality``) and the valid frame
    count of each item. ``decode`` is its inverse, [B, 32, T] -> [B, 1, T * samples_per_frame].
    ``identity`` names the codec and its settings and weights; it keys the code cache.
    """

    sample_rate: int = 24_000
    frame_rate: float = 12.5
    num_codebooks: int = 32
    cardinality: int = 2048
    random_weights: bool = False
    weights_sha256: str | None = None  # sha256 of the weights file, for codecs loaded from one

    @property
    def samples_per_frame(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    @abstractmethod
    def identity(self) -> str: ...

    @abstractmethod
    def encode(self, wav: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor: ...

    def frames_for(self, num_samples: int) -> int:
        """Number of code frames for a clip of ``num_samples`` samples."""
        return -(-num_samples // self.samples_per_frame)

    @contextmanager
    def streaming_decoder(self, batch_size: int = 1) -> Iterator[Callable[[Tensor], Tensor]]:
        """Yields ``step(codes [B, 32, t]) -> wav [B, 1, t * samples_per_frame]`` for chunked decoding.

        The default decodes each chunk independently; codecs with state (Mimi) override it.
        """
        with torch.no_grad():
            yield self.decode

    @contextmanager
    def row_decoder(self, rows: int) -> Iterator[RowDecoder]:
        """Yields a ``RowDecoder`` of ``rows`` independent streams (a server's sequences): each call
        decodes only the rows given. The default decodes each chunk independently (one batch); codecs
        with state (Mimi) keep one stream per row."""
        with torch.no_grad():
            yield RowDecoder(self.decode)


class RowDecoder:
    """Independent decoding streams, one per row: ``decode({row: codes [32, t]})`` -> ``{row: wav
    [t * samples_per_frame]}`` for the rows given (only those are computed); ``reset(row)`` starts
    the row's stream afresh (a new piece). This one is stateless: one batched decode per call."""

    def __init__(self, decode: Callable[[Tensor], Tensor]):
        self._decode = decode

    def reset(self, row: int) -> None:
        pass

    def decode(self, chunks: dict[int, Tensor]) -> dict[int, Tensor]:
        if not chunks:
            return {}
        t = max(c.shape[1] for c in chunks.values())
        codes = torch.zeros(len(chunks), next(iter(chunks.values())).shape[0], t, dtype=torch.long)
        for b, c in enumerate(chunks.values()):
            codes[b, :, : c.shape[1]] = c  # shorter chunks padded (and the padding's audio cut off)
        wav = self._decode(codes)  # [B, 1, t * spf]
        spf = wav.shape[-1] // t
        return {row: wav[b, 0, : c.shape[1] * spf] for b, (row, c) in enumerate(chunks.items())}
