"""Shared fixtures: offline environment, a session code cache, and the fast training config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network (the hub code paths resolve from the cache or fail fast).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")




def checkpointing_run(steps: int) -> list[str]:
    """Overrides for a short run that checkpoints every 2 steps (resume and kill tests)."""
    return [
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=100",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_last=true",
        "callbacks.best=null",
        "callbacks.audio_samples=null",
        "optim.warmup_steps=2",
    ]


@pytest.fixture(scope="session")
def code_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Mimi-code cache for the whole session (the sample clips are encoded once)."""
    return tmp_path_factory.mktemp("elise_cache")


@pytest.fixture(scope="session")
def fast_overrides(code_cache: Path) -> list[str]:
    """experiment=demo made fast: small model, CSV only, no progress bar, every step logged."""
    return [
        "experiment=demo",
        # one torch thread: tiny models on a busy 2-core machine otherwise oversubscribe OpenMP
        # (measured: a 6-step run took 60 s with the default 2 threads, 2 s with one)
        "threads=1",
        "logger=csv",
        f"paths.cache_dir={code_cache}",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "callbacks.audio_samples.max_frames=4",
        "model=test",  # the tiny preset at a quarter width: small CPU steps and checkpoints
    ]
