"""Frame-by-frame generation with KV caches (backbone across frames, decoder reset per frame).

Sampling never emits ids >= 2048 (the spare audio ids are not Mimi codes); ``top_k=1`` (or
``temperature=0``) is greedy. Generation stops when every item has produced the all-zero EOS frame
or at ``max_frames``. Batched prompts of different lengths are left-padded and masked.

End of speech under sampling is judged on the greedy choice: an item ends only when EOS is the argmax
of codebook 0 (and it has made ``min_frames``); otherwise codebook 0 is sampled with EOS excluded.
Sampling EOS itself cut speech short: a 2-5% EOS probability per frame, drawn at every frame, ends a
2-second sentence early more often than not. Greedy decoding is unchanged (EOS = the all-zero frame).
Each item may have its own ``torch.Generator``, so an item's audio does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elise.layout import CODEBOOK_SIZE, EOS_CODE, NUM_CODEBOOKS, ROW_WIDTH, pad_rows
from elise.model.csm import CSM

Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per item


@dataclass
class SamplingConfig:
    temperature: float = 0.9
    top_k: int = 50
    depth_temperature: float | None = None  # codebooks 1..31 (None: ``temperature``)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature <= 0

    def depth(self) -> SamplingConfig:
        """The config of codebooks 1..31."""
        if self.depth_temperature is None:
            return self
        return SamplingConfig(float(self.depth_temperature), self.top_k)


def sample_logits(logits: Tensor, cfg: SamplingConfig, generator: Generators = None) -> Tensor:
    """logits [B, V] -> ids [B], restricted to real codes (< 2048); ``generator`` may be one per row."""
    logits = logits[:, :CODEBOOK_SIZE].float()  # [B, 2048]: drop the spare ids
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, 2048]
    if isinstance(generator, list):  # row b draws from its own generator: independent of the batch
        rows = [torch.multinomial(probs[b : b + 1], 1, generator=g) for b, g in enumerate(generator)]
        return torch.cat(rows).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad (tokens [n, 33], mask [n, 33]) prompts -> tokens, mask [B, S, 33], pad counts [B]."""
    length = max(t.shape[0] for t, _ in prompts)
    tokens = torch.zeros(len(prompts), length, ROW_WIDTH, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, ROW_WIDTH, dtype=torch.bool)
    pads = torch.tensor([length - t.shape[0] for t, _ in prompts])
    for i, (t, m) in enumerate(prompts):
        tokens[i, length - t.shape[0] :] = t
        mask[i, length - t.shape[0] :] = m
    return tokens, mask, pads


class FrameGenerator:
    """Holds the caches for one batch and decodes frames from backbone hidden states.

    Lockstep (``generate``): ``prefill`` the left-padded prompts, then ``decode_frame`` and ``advance``
    once per frame, every item at the same cache position. Per-row slots (the server's continuous
    batching): ``prefill_rows`` puts prompts into rows at their own position 0, ``advance_rows`` feeds
    each of the first n rows its frame at its own position (``lengths``), ``move_row`` packs the rows;
    rows join and leave between frames.
    """

    def __init__(self, model: CSM, batch_size: int, max_len: int, sampling: SamplingConfig, generator=None):
        p = next(model.parameters())
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]  # one item: its generator draws for the whole (1-row) batch
        self.model, self.sampling, self.generator = model, sampling, generator
        self.depth_sampling = sampling.depth()  # codebooks 1..31
        self.offsets = model.audio_offsets.tolist()  # python ints: no per-step tensor indexing
        self.backbone_cache = model.backbone.make_cache(batch_size, max_len, p.dtype, p.device)
        self.decoder_cache = model.decoder.make_cache(batch_size, NUM_CODEBOOKS, p.dtype, p.device)
        self.device = p.device
        self.pads: Tensor | None = None
        self.h: Tensor | None = None  # [B, Db] hidden state predicting the next frame
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=p.device)  # per-row slots: positions

    @property
    def hidden(self) -> Tensor:
        """The backbone hidden state [B, Db] that predicts the next frame (set by ``prefill``/``advance``)."""
        if self.h is None:
            raise RuntimeError("FrameGenerator: call prefill() before decoding a frame")
        return self.h

    def _key_mask(self, s: int) -> Tensor | None:
        """Bool [B, 1, s, cache slots] hiding left padding (None when there is none); the backbone adds
        causality at the cache position."""
        if self.pads is None or not bool(self.pads.any()):
            return None
        k = torch.arange(self.backbone_cache.max_len, device=self.device)  # [max_len]
        q = torch.arange(self.backbone_cache.pos, self.backbone_cache.pos + s, device=self.device)  # [s]
        allowed = (k[None, None, :] >= self.pads[:, None, None]).expand(-1, s, -1)  # [B, s, max_len]
        # a fully padded query row would attend nothing (NaN): let it see itself
        allowed = allowed | (k[None, :] == q[:, None])[None]
        return allowed.unsqueeze(1)

    def _positions(self, s: int) -> Tensor | None:
        if self.pads is None or not bool(self.pads.any()):
            return None
        pos = torch.arange(self.backbone_cache.pos, self.backbone_cache.pos + s, device=self.device)
        return (pos[None, :] - self.pads[:, None]).clamp(min=0)  # [B, s]

    def prefill(self, tokens: Tensor, mask: Tensor, pads: Tensor | None = None) -> None:
        """Run the prompt rows [B, S, 33] (left-padded by ``pads`` [B]) through the backbone."""
        self.pads = None if pads is None else pads.to(self.device)
        s = tokens.shape[1]
        h = self.model.backbone(
            self.model.embed_rows(tokens, mask), self._positions(s), self.backbone_cache, self._key_mask(s)
        )
        self.h = h[:, -1]

    def decode_frame(
        self,
        h: Tensor,
        allow_eos: Tensor | None = None,
        sampling: SamplingConfig | None = None,
        generator: Generators = None,
        forced: Tensor | None = None,
        logits: list[Tensor] | None = None,
    ) -> Tensor:
        """Codebook 0 from the backbone head, then 1..31 from the depth decoder. h [B, Db] -> codes [B, 32].

        ``allow_eos`` [B] bool (None: all): items that may end at this frame. Sampled, an item ends
        (an all-zero EOS frame) only when EOS is the argmax of codebook 0. ``sampling``/``generator``:
        this call's (None: the generator's own), e.g. one group of a server's rows.
        ``forced`` [B, 32] (teacher forcing, for agreement checks): the depth decoder is fed these codes
        instead of its picks (the picks are still returned); ``logits``: receives each codebook's logits
        [B, 2048] fp32 in order (32 appends).
        """
        m, cache = self.model, self.decoder_cache
        if h.shape[0] != cache.k.shape[1]:
            cache = cache.rows(0, h.shape[0])  # fewer rows than the batch (a group of the server's rows)
        sampling = sampling or self.sampling
        depth = self.depth_sampling if sampling is self.sampling else sampling.depth()
        generator = self.generator if generator is None else generator
        logits0 = m.codebook0_logits(h)[:, :CODEBOOK_SIZE].float()  # [B, 2048]
        ends = None  # [B] items whose frame is EOS (sampled: decided on the argmax)
        if not sampling.greedy:
            ends = logits0.argmax(-1) == EOS_CODE
            if allow_eos is not None:
                ends &= allow_eos
            logits0[:, EOS_CODE] = float("-inf")  # codebook 0 of a speech frame is sampled without EOS
        elif allow_eos is not None:
            logits0[:, EOS_CODE].masked_fill_(~allow_eos, float("-inf"))
        if logits is not None:
            logits.append(logits0)
        c0 = sample_logits(logits0, sampling, generator)  # [B]
        if ends is not None:
            c0 = torch.where(ends, EOS_CODE, c0)
        cache.reset()
        fed = c0 if forced is None else forced[:, 0]
        x = torch.stack([h, m.audio_embeddings(fed)], dim=1)  # [B, 2, Db] (codebook 0 offset is 0)
        out = m.decoder(m.project(x), cache=cache)[:, -1]  # [B, Dd]
        codes = torch.empty(h.shape[0], NUM_CODEBOOKS, dtype=torch.long, device=h.device)  # [B, 32]
        codes[:, 0] = c0
        offsets = self.offsets
        for k in range(1, NUM_CODEBOOKS):
            logits_k = m.codebook_logits(out, k)  # [B, V]
            if logits is not None:
                logits.append(logits_k[:, :CODEBOOK_SIZE].float())
            c = sample_logits(logits_k, depth, generator)  # [B]
            codes[:, k] = c
            if k < NUM_CODEBOOKS - 1:
                e = m.audio_embeddings((c if forced is None else forced[:, k]) + offsets[k])  # [B, Db]
                out = m.decoder(m.project(e[:, None]), cache=cache)[:, -1]  # [B, Dd]
        if ends is not None:
            codes.masked_fill_(ends[:, None], EOS_CODE)  # the EOS frame
        return codes

    def frame_embedding(self, codes: Tensor) -> Tensor:
        """A generated frame [B, 32] as the backbone's input row [B, 1, Db]: the sum of its 32 code
        embeddings (an audio row, without building the [B, 1, 33] row and mask)."""
        ids = codes + self.model.audio_offsets  # [B, 32]
        return F.embedding_bag(ids, self.model.audio_embeddings.weight, mode="sum")[:, None]  # [B, 1, Db]

    def advance(self, codes: Tensor) -> None:
        """Feed a generated frame [B, 32] back into the backbone (every item at the cache position)."""
        x = self.frame_embedding(codes)
        h = self.model.backbone(x, self._positions(1), self.backbone_cache, self._key_mask(1))
        self.h = h[:, -1]

    # ---- per-row slots (continuous batching) ----------------------------------------------------
    def prefill_rows(self, start: int, prompts: list[tuple[Tensor, Tensor]]) -> None:
        """Prompts (tokens [n_i, 33], mask [n_i, 33]) into rows ``start``.. in one backbone pass, each
        at its own positions 0..n_i-1: right-padded, and causal attention keeps a row's padding unseen
        (its slots are overwritten by the row's next frames). Sets those rows' hidden state and length."""
        if self.h is None or self.h.shape[0] != self.lengths.shape[0]:
            b, d = self.lengths.shape[0], self.model.cfg.backbone.dim
            self.h = torch.zeros(b, d, dtype=self.backbone_cache.k.dtype, device=self.device)
        n = len(prompts)
        tokens, mask = pad_rows(prompts)  # padding: fully masked rows
        lengths = torch.tensor([t.shape[0] for t, _ in prompts], device=self.device)  # [n]
        x = self.model.embed_rows(tokens.to(self.device), mask.to(self.device))  # [n, S, Db]
        h = self.model.backbone(x, None, self.backbone_cache.rows(start, start + n))  # [n, S, Db]
        self.h[start : start + n] = h[torch.arange(n, device=self.device), lengths - 1]
        self.lengths[start : start + n] = lengths

    def advance_rows(self, codes: Tensor) -> None:
        """Feed frame [n, 32] of rows 0..n-1, each written at its own slot ``lengths[i]``."""
        n = codes.shape[0]
        h_all = self.hidden
        pos = self.lengths[:n]  # [n] the slot each row writes
        end = int(pos.max()) + 1
        backbone = self.model.backbone
        x = self.frame_embedding(codes)  # [n, 1, Db]
        cos, sin = backbone.rope(pos[:, None], 0, 1, x.dtype)  # [n, 1, 1, hd]
        mask = (torch.arange(end, device=self.device)[None, :] <= pos[:, None])[
            :, None, None, :
        ]  # [n, 1, 1, end]
        cache = self.backbone_cache
        h = backbone.step(x, cos, sin, cache.k[:, :n, :, :end], cache.v[:, :n, :, :end], pos[:, None], mask)
        h_all[:n] = h[:, -1]  # [n, Db]
        self.lengths[:n] += 1

    def move_row(self, src: int, dst: int) -> None:
        """Row ``src``'s cache, hidden state and length into row ``dst`` (packing the rows)."""
        n, cache, h = int(self.lengths[src]), self.backbone_cache, self.hidden
        cache.k[:, dst, :, :n] = cache.k[:, src, :, :n]
        cache.v[:, dst, :, :n] = cache.v[:, src, :, :n]
        h[dst], self.lengths[dst] = h[src], self.lengths[src]


@torch.inference_mode()
def generate(
    model: CSM,
    tokens: Tensor,
    mask: Tensor,
    max_frames: int | Tensor,
    sampling: SamplingConfig | None = None,
    generator: Generators = None,
    pads: Tensor | None = None,
    stop_on_eos: bool = True,
    on_frame: Callable[[Tensor, Tensor], None] | None = None,
    min_frames: int | Tensor = 0,
) -> tuple[Tensor, Tensor]:
    """Generate audio frames after a prompt.

    Args:
        tokens, mask: prompt rows [B, S, 33] (left-padded by ``pads`` [B] when items differ in length).
        max_frames: frame limit, an int or one per item [B].
        generator: one for the batch, or a list with one per item (batch-independent audio).
        min_frames: frames before which an item may not end, an int or one per item [B].
        on_frame: called with (codes [B, 32], finished [B] bool) after every frame (streaming).

    Returns:
        codes [B, 32, F] and the number of frames of each item before its EOS frame [B].
    """
    sampling = sampling or SamplingConfig()
    b = tokens.shape[0]
    limits = torch.as_tensor(max_frames).expand(b).clone()
    floors = torch.as_tensor(min_frames).expand(b).clone()
    total = int(limits.max())
    gen = FrameGenerator(model, b, tokens.shape[1] + total, sampling, generator)
    gen.prefill(tokens.to(gen.device), mask.to(gen.device), pads)
    lengths = torch.full((b,), -1, dtype=torch.long)
    frames = []
    floors_dev, floor_max = floors.to(gen.device), int(floors.max())
    for f in range(total):
        codes = gen.decode_frame(gen.hidden, floors_dev <= f if f < floor_max else None)  # [B, 32]
        frames.append(codes.cpu())
        eos = (frames[-1] == EOS_CODE).all(-1) if stop_on_eos else torch.zeros(b, dtype=torch.bool)
        newly = (lengths < 0) & (eos | (f + 1 >= limits))
        lengths[newly & eos] = f
        lengths[newly & ~eos] = f + 1
        if on_frame is not None:
            on_frame(codes, lengths >= 0)
        if bool((lengths >= 0).all()):
            break
        gen.advance(codes)
    return torch.stack(frames, dim=2), lengths
