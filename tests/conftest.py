"""Shared fixtures: offline environment, a session code cache, and the fast training config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from testkit import checkpointing_run, lj_folder, save_tiny, tone  # noqa: F401 (re-exported)

# No test may reach the network (the hub code paths resolve from the cache or fail fast).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # and for their subprocesses
    import torch

    torch.set_num_threads(1)


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


@pytest.fixture(autouse=True)
def _drop_root_log_handlers():
    """A command run in-process (Hydra's job logging, synthesize.log) adds handlers to the root logger
    bound to this test's captured stdout or tmp dir; a later test in the same worker would log into a
    closed stream ("--- Logging error ---" on its stderr). Remove what the test added."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before]:
        if type(handler) in (logging.StreamHandler, logging.FileHandler):  # not pytest's capture handlers
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


# ---- shared test data: a tone, an LJSpeech folder, a tiny model and its checkpoint ----------------


@pytest.fixture
def ljspeech_folder(tmp_path: Path) -> Path:
    """A 6-clip LJSpeech folder (16 kHz tones, ``c00|Clip number 0.``...)."""
    return lj_folder(tmp_path / "lj", 6)


@pytest.fixture(scope="session")
def tiny_model():
    """The seeded ``tiny`` preset in eval mode (random heads: see save_tiny)."""
    import torch

    from elise.model import build_model

    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-model checkpoint file (bytes tokenizer) that synthesis loads."""
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
