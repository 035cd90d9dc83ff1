"""The Hugging Face hub, asked quickly: whether it is switched off, and one short metadata call.

huggingface_hub and datasets retry an unreachable hub for ~30 s per file (minutes for a model of
several files); every hub path in elise asks ``reachable`` first, so offline machines fail or fall
back at once.
"""

from __future__ import annotations

import os

OFF = {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (not at huggingface_hub's import), so a later setting is honoured."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in OFF


def check(repo: str, kind: str = "model", timeout: float = 10.0) -> None:
    """Raise (huggingface_hub's error) unless ``repo`` answers one metadata call within ``timeout`` s.

    An unreachable hub, a missing or gated repo fail here in well under a second.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    info = api.dataset_info if kind == "dataset" else api.model_info
    info(repo, timeout=timeout)


def reachable(repo: str, kind: str = "model", timeout: float = 10.0) -> str | None:
    """None when ``repo`` can be fetched from the hub now, else why not (one line)."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    try:
        check(repo, kind, timeout)
    except Exception as err:  # hub errors come as many types (HTTP, gated, not found, connection)
        return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return None
