"""Kyutai's Mimi codec (from ``moshi``) behind elise's ``Codec`` interface.

``build_mimi`` loads the real weights (a local file or the Hugging Face hub); ``build_mimi_random``
builds the same architecture with seeded random weights, so the whole pipeline runs offline (its
audio is noise). Both run in fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import safe_open
from torch import Tensor

from elise.codec.base import Codec, CodecUnavailable, RowDecoder
from elise.codec.common import check_codes, check_wav, frames_from_lengths, pad_to_frames

if TYPE_CHECKING:  # moshi is imported lazily at run time (only the Mimi codecs need it)
    from moshi.models.compression import MimiModel

log = logging.getLogger(__name__)

DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, weights hashed once
_WARNED_RANDOM = False
RANDOM_INIT_VERSION = 1  # bump when random_mimi's recipe changes


class MimiCodec(Codec):
    """Wraps a ``moshi.models.compression.MimiModel``: fp32, eval mode, no grad, batched encode."""

    def __init__(
        self,
        model: MimiModel,
        identity: str,
        batch_size: int = 8,
        random_weights: bool = False,
        weights_sha256: str | None = None,
    ):
        super().__init__()
        self.model = model.float().eval()
        self.num_codebooks = int(model.num_codebooks)
        self.batch_size = max(1, int(batch_size))
        self.random_weights = random_weights
        self.weights_sha256 = weights_sha256
        self._identity = identity

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, wav: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_wav(wav)
        b, _, n = wav.shape
        frames = frames_from_lengths(lengths, b, n, self.samples_per_frame)  # [B]
        x = pad_to_frames(wav, self.samples_per_frame)  # [B, 1, T * 1920]
        t = x.shape[-1] // self.samples_per_frame
        if t == 0:  # moshi's convolutions reject empty input
            empty = torch.zeros(b, self.num_codebooks, 0, dtype=torch.long)  # [B, K, 0]
            return empty.to(wav.device), frames.to(wav.device)
        chunks = [
            self.model.encode(x[i : i + self.batch_size].to(self.device, torch.float32))  # [b, K, T]
            for i in range(0, b, self.batch_size)
        ]
        codes = torch.cat(chunks).long()  # [B, K, T]
        return codes.to(wav.device), frames.to(wav.device)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        check_codes(codes, self.num_codebooks, self.cardinality)
        return self.model.decode(codes.to(self.device)).to(codes.device)  # [B, 1, T * 1920]

    @contextmanager
    def streaming_decoder(self, batch_size: int = 1) -> Iterator[Callable[[Tensor], Tensor]]:
        """Yields ``step(codes [B, K, t]) -> wav [B, 1, t * 1920]`` using moshi's stateful streaming decode."""

        def step(codes: Tensor) -> Tensor:
            check_codes(codes, self.num_codebooks, self.cardinality)
            if codes.shape[0] != batch_size:
                raise ValueError(f"streaming decoder opened for batch {batch_size}, got {codes.shape[0]}")
            return self.model.decode(codes.to(self.device)).to(codes.device)  # [B, 1, t * 1920]

        roots = self._decoding_roots()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for root in roots:
                stack.enter_context(root.streaming(batch_size))
            yield step

    def _decoding_roots(self) -> list[Any]:
        """The streaming modules of the decoding side: only it streams (moshi's model-wide streaming
        state would also take over the encoder, and a server encodes uploaded voices while its
        decoder streams stay open)."""
        m = self.model
        parts = [x for x in (getattr(m, "upsample", None), m.decoder_transformer, m.decoder) if x is not None]
        return [root for part in parts for root in _streaming_roots(part)]

    @contextmanager
    def row_decoder(self, rows: int) -> Iterator[RowDecoder]:
        """``rows`` streams of batch 1 (moshi's state of each streaming module, swapped in per call), so a
        call decodes only the rows that have frames, not every row of a fixed batch."""
        roots = self._decoding_roots()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            states = []
            for _ in range(rows):
                for root in roots:
                    stack.enter_context(root.streaming(1))
                states.append([root.get_streaming_state() for root in roots])
                _detach(roots, states[-1])
            yield MimiRows(self, roots, states)


class MimiRows(RowDecoder):
    """Mimi's row decoder: one batch-1 streaming state per row; a call runs the given rows one by one
    (each with its own state in place), then detaches the states (a plain ``decode`` stays plain)."""

    def __init__(self, codec: MimiCodec, roots: list[Any], states: list[list[dict[str, Any]]]):
        super().__init__(codec.decode)
        self.codec, self.roots, self.states = codec, roots, states

    def reset(self, row: int) -> None:
        _attach(self.roots, self.states[row])
        try:
            for root in self.roots:
                root.reset_streaming()
        finally:
            _detach(self.roots, self.states[row])

    def decode(self, chunks: dict[int, Tensor]) -> dict[int, Tensor]:
        out = {}
        for row, codes in chunks.items():
            _attach(self.roots, self.states[row])
            try:
                out[row] = self.codec.decode(codes[None])[0, 0]  # [t * 1920]
            finally:
                _detach(self.roots, self.states[row])
        return out


def _attach(roots: list[Any], states: list[dict[str, Any]]) -> None:
    for root, state in zip(roots, states, strict=True):
        root.set_streaming_state(state)


def _detach(roots: list[Any], states: list[dict[str, Any]]) -> None:
    for root, state in zip(roots, states, strict=True):
        root.set_streaming_state(dict.fromkeys(state))


def _streaming_roots(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost moshi StreamingModules in ``module`` (itself, or the first ones below it)."""
    from moshi.modules.streaming import StreamingModule

    if isinstance(module, StreamingModule):
        return [module]
    return [root for child in module.children() for root in _streaming_roots(child)]


def build_mimi(
    weights: str | None = None,
    repo: str = DEFAULT_REPO,
    num_codebooks: int = 32,
    batch_size: int = 8,
    device: str = "cpu",
) -> MimiCodec:
    """Mimi with its real weights: ``weights`` (a local .safetensors file) or, when None, the hub file.

    Raises:
        CodecUnavailable: the weights cannot be fetched or loaded (one-line message saying what to do).
    """
    from moshi.models import loaders

    num_codebooks = _check_nq(num_codebooks)
    path = Path(weights).expanduser() if weights else _hub_file(repo, loaders.MIMI_NAME)
    if not path.is_file():
        raise CodecUnavailable(
            f"Mimi weights file {path} does not exist; pass codec.weights=<file> or use codec=mimi_random"
        )
    try:  # read the header first: a bad file fails here, before the ~1 s model construction
        if path.suffix in {".safetensors", ".sft", ".sfts"}:  # moshi also takes a torch .pt package
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        model = loaders.get_mimi(path, device=device, num_codebooks=num_codebooks)
    except Exception as err:  # corrupt file, wrong keys or shapes: all mean "these are not Mimi weights"
        raise CodecUnavailable(
            f"cannot load Mimi weights from {path} ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}); "
            "pass codec.weights=<file> or use codec=mimi_random"
        ) from err
    sha = file_sha256(path)
    identity = f"mimi(nq={num_codebooks},weights={path.name},sha256={sha[:16]})"
    return MimiCodec(model, identity, batch_size=batch_size, weights_sha256=sha)


def build_mimi_random(
    seed: int = 0, num_codebooks: int = 32, batch_size: int = 8, device: str = "cpu"
) -> MimiCodec:
    """Mimi's real architecture with seeded random weights (deterministic across processes)."""
    global _WARNED_RANDOM
    if not _WARNED_RANDOM:
        log.warning(
            "codec=mimi_random: Mimi with RANDOM weights (seed %d); its decoded audio is NOISE. "
            "Use codec=mimi for real speech.",
            seed,
        )
        _WARNED_RANDOM = True
    model = random_mimi(seed, _check_nq(num_codebooks), device)
    # RANDOM_INIT_VERSION and moshi's version: a change of init recipe must not reuse cached codes
    identity = f"mimi_random(v{RANDOM_INIT_VERSION},moshi={_moshi_version()},seed={seed},nq={num_codebooks})"
    return MimiCodec(model, identity, batch_size, random_weights=True)


def random_mimi(seed: int, num_codebooks: int = 32, device: str = "cpu") -> MimiModel:
    """A moshi ``MimiModel`` with seeded random weights and codebooks scaled so that codes vary.

    Moshi's codebooks start at zero (EMA buffers filled by k-means in training), which would make every
    code 0. Each level's codebook is drawn from N(mean, std^2) of that level's residual (per dimension)
    on a seeded calibration signal, so every level splits its input among many entries.
    """
    from moshi.models import loaders
    from moshi.quantization.core_vq import EuclideanCodebook, VectorQuantization
    from moshi.quantization.vq import SplitResidualVectorQuantizer

    with torch.random.fork_rng(devices=[]):  # seed moshi's default init without touching global RNG
        torch.manual_seed(seed)
        model = loaders.get_mimi(None, device="cpu", num_codebooks=num_codebooks)
    gen = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(2, 1, 12 * 1920, generator=gen)  # [2, 1, N] calibration noise
    with torch.no_grad():
        emb = model._encode_to_unquantized_latent(wav)  # [2, 512, 12]
        quantizer = cast(SplitResidualVectorQuantizer, model.quantizer)  # typed as BaseQuantizer
        for rvq in (quantizer.rvq_first, quantizer.rvq_rest):
            residual = rvq.input_proj(emb)  # [2, 256, 12]
            for module in rvq.vq.layers:
                layer = cast(VectorQuantization, module)  # nn.ModuleList yields plain Modules
                book: EuclideanCodebook = layer._codebook
                r = layer.project_in(layer._rearrange_input(residual)).flatten(0, 1)  # [N, D]
                noise = torch.randn(book.embedding_sum.shape, generator=gen)  # [2048, D]
                book.embedding_sum.copy_(r.mean(0) + noise * r.std(0).clamp(min=1e-8))
                book.cluster_usage.fill_(1.0)
                book._initialized.fill_(1.0)
                book.register_buffer("_embedding", None, persistent=False)  # drop the cached centroids
                residual = residual - layer.decode(layer.encode(residual))  # [2, 256, 12]
    return model.to(device).eval()


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _hub_file(repo: str, filename: str) -> Path:
    """Path of ``filename`` from hub ``repo`` (downloaded or from the HF cache), or CodecUnavailable.

    HF_HUB_CACHE and HF_HUB_OFFLINE are read here rather than at huggingface_hub's import, so a
    process (or test) that sets them later is honoured.
    """
    from huggingface_hub import hf_hub_download

    from elise import hub

    offline = hub.offline()
    cache_dir = os.environ.get("HF_HUB_CACHE")
    try:
        # the released Mimi file never changes: a cached copy is used without asking the hub
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True))
    except Exception as err:
        if offline:
            raise _unavailable(repo, filename, err, offline) from err
    try:
        hub.check(repo)  # an unreachable hub fails here, not after the download's retries
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
    except Exception as err:  # offline, 401/404, network errors: all mean "no weights from the hub"
        raise _unavailable(repo, filename, err, offline) from err


def _unavailable(repo: str, filename: str, err: Exception, offline: bool) -> CodecUnavailable:
    return CodecUnavailable(
        f"cannot fetch Mimi weights {repo}/{filename} from the Hugging Face hub ({type(err).__name__}"
        f"{', offline' if offline else ''}); pass codec.weights=<local .safetensors file> "
        "or use codec=mimi_random (random weights, noise audio)"
    )


def _moshi_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moshi")
    except PackageNotFoundError:
        return "unknown"


def _check_nq(num_codebooks: int) -> int:
    if not 1 <= int(num_codebooks) <= 32:
        raise ValueError(f"Mimi has 32 codebooks; num_codebooks must be in 1..32, got {num_codebooks}")
    return int(num_codebooks)
