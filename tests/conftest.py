"""Shared fixtures: offline environment, a session code cache, and the fast training config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network (the hub code paths resolve from the cache or fail fast).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # and for their subprocesses
    import torch

    torch.set_num_threads(1)


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


# ---- shared test data: a tone, an LJSpeech folder, a tiny model and its checkpoint ----------------


def tone(seconds: float, sr: int = 16_000, channels: int = 1, freq: float = 440.0, amp: float = 0.5):
    """A sine of ``freq`` Hz, float32 [N] (or [N, channels] with the tone on channel 0 only)."""
    import numpy as np

    t = np.arange(int(seconds * sr)) / sr
    wav = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)  # [N]
    return wav if channels == 1 else np.stack([wav] + [np.zeros_like(wav)] * (channels - 1), axis=1)


def lj_folder(root: Path, n: int, seconds: float = 0.6) -> Path:
    """An LJSpeech folder of ``n`` distinct good clips (different pitches, so different hashes)."""
    import soundfile as sf

    (root / "wavs").mkdir(parents=True)
    lines = []
    for i in range(n):
        sf.write(root / "wavs" / f"c{i:02d}.wav", tone(seconds, freq=200.0 + 37 * i), 16_000)
        lines.append(f"c{i:02d}|Clip number {i}.")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def save_tiny(path: Path, *, zero_norm: bool = False, codec: str | None = None) -> Path:
    """A checkpoint of the training contract: random heads (so EOS, all 32 codes 0, practically never
    comes), or zero final norms (all logits 0: greedy picks code 0 everywhere = the EOS frame).
    ``codec`` records a codec identity as training does (None: an older checkpoint without one)."""
    import torch

    from elise.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        torch.nn.init.normal_(model.codebook0_head.weight, std=1.0)
        torch.nn.init.normal_(model.audio_head, std=1.0)
        if zero_norm:
            model.backbone.norm.weight.zero_()
            model.decoder.norm.weight.zero_()
    state = {"model." + k: v for k, v in model.state_dict().items()}
    hparams = {"model": model.cfg.to_dict(), "tokenizer": "bytes"}
    if codec is not None:
        from elise.codec import codec_identity
        from elise.config import conf_defaults

        hparams["codec"] = codec_identity(codec, conf_defaults(f"codec/{codec}"))
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return path


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
