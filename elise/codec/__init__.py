"""Audio codecs behind one interface (``elise.codec.base.Codec``), built by name from the ``codec=`` config.

- ``tiny``: a small seeded random codec of Mimi's shapes, for tests and demos (fast on CPU).
- ``mimi_random``: Kyutai's real Mimi architecture with seeded random weights (its audio is noise).
- ``mimi``: the real Mimi weights, from a local file or the Hugging Face hub.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from elise.codec.base import Codec


class CodecUnavailable(RuntimeError):
    """The codec's weights cannot be had (offline, no access, missing or corrupt file)."""


CODECS = ("tiny", "mimi", "mimi_random")


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


__all__ = ["CODECS", "Codec", "CodecUnavailable", "build_codec"]
