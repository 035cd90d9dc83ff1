"""Audio codecs behind one interface (``elise.codec.base.Codec``), built by name from the ``codec=`` config.

- ``tiny``: a small seeded random codec of Mimi's shapes, for tests and demos (fast on CPU).
- ``mimi_random``: Kyutai's real Mimi architecture with seeded random weights (its audio is noise).
- ``mimi``: the real Mimi weights, from a local file or the Hugging Face hub.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from elise.codec.base import Codec, CodecUnavailable

log = logging.getLogger(__name__)
CODECS = ("tiny", "mimi", "mimi_random")
DEFAULT_CODEC = "mimi"  # what a model without a codec record is assumed to use (CSM and Marvis are)
RUNTIME_KEYS = ("device", "batch_size", "name")  # codec settings that do not change its codes


def build_codec(name: str, **kwargs: Any) -> Codec:
    """Build a codec from its config group: ``build_codec(**OmegaConf.to_container(cfg.codec))``;
    options not given take their value from ``conf/codec/<name>.yaml``.

    Moshi is imported only for the Mimi codecs, so ``tiny`` stays light.
    """
    factory: Callable[..., Codec]
    if name == "tiny":
        from elise.codec.tiny import TinyCodec as factory
    elif name == "mimi":
        from elise.codec.mimi import build_mimi as factory
    elif name == "mimi_random":
        from elise.codec.mimi import build_mimi_random as factory
    else:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    from elise.config import conf_defaults

    allowed = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"codec {name!r}: unknown option(s) {unknown}; known: {sorted(allowed)}")
    settings = {k: v for k, v in conf_defaults(f"codec/{name}").items() if k != "name"}
    settings.update(kwargs)  # the yaml of the codec holds its defaults; given options win
    return factory(**settings)


def codec_identity(
    name: str, config: dict[str, Any] | None = None, codec: Codec | None = None
) -> dict[str, Any]:
    """What a checkpoint or an export records of its codec: ``{"name", "config", "weights_sha256"}``.

    ``config`` holds the codec's settings (seed for the random codecs; run-time keys such as device
    and batch_size are dropped); ``weights_sha256`` is the sha256 of the weights file (from the built
    ``codec`` or ``config["weights"]``), None for codecs without one (tiny, mimi_random).
    """
    settings = {k: v for k, v in dict(config or {}).items() if k not in RUNTIME_KEYS}
    sha = getattr(codec, "weights_sha256", None)
    if sha is None and settings.get("weights"):
        from pathlib import Path

        from elise.codec.mimi import file_sha256

        weights = Path(str(settings["weights"])).expanduser()
        sha = file_sha256(weights) if weights.is_file() else None
    return {"name": str(name), "config": settings, "weights_sha256": sha}


def check_codec(recorded: dict[str, Any] | None, requested: str | None) -> tuple[str, str | None]:
    """(codec name to use, one warning line or None) for a model trained on ``recorded``.

    ``requested`` None means "the recorded one". A requested codec that differs from the record runs
    (the user asked) with a warning naming both; a model without a record (older checkpoints, foreign
    directories) uses the requested codec, else ``DEFAULT_CODEC``, with a line saying so.
    """
    if not recorded or not recorded.get("name"):
        name = requested or DEFAULT_CODEC
        return name, f"the checkpoint does not record its codec (older elise): using codec={name}"
    trained = str(recorded["name"])
    if requested is None or str(requested) == trained:
        return trained, None
    return str(requested), (
        f"codec={requested} was asked for but the model was trained on codec={trained}: "
        "its audio will be wrong unless they share codes"
    )


__all__ = ["CODECS", "Codec", "CodecUnavailable", "build_codec", "check_codec", "codec_identity"]
