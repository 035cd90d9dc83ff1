"""Plain helpers the tests import (``from testkit import ...``): a short checkpointing run, a tone,
an LJSpeech folder, a tiny checkpoint. Not in conftest.py: ``from conftest import`` picks whichever
conftest.py (tests/serve/, ...) pytest imported first."""

from __future__ import annotations

from pathlib import Path


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


def sigterm_at(step: int):
    """A Lightning callback that sends this process SIGTERM after training step ``step`` (preemption)."""
    import os
    import signal

    import lightning.pytorch as pl

    class SigtermAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return SigtermAt()


def record_bases(monkeypatch) -> list:
    """Every ``base=`` the one checkpoint loader (``elise.synthesis.runtime.load_model``) is given; the
    model still loads without it (the test checkpoint is not a LoRA)."""
    import elise.synthesis.runtime as runtime

    seen: list = []
    real = runtime.load_model

    def spy(path, map_location="cpu", base=None):
        seen.append(base)
        return real(path, map_location=map_location, base=None)

    monkeypatch.setattr(runtime, "load_model", spy)
    return seen


def same_result(a, b, counts: bool = True) -> None:
    """Two ``PreparedData`` hold the same kept clips (ids, texts, text ids, frames, splits, speakers),
    the same codes and the same report counts (``counts``: encoded + cached too)."""
    import numpy as np

    key = [(e.id, e.text, e.text_ids, e.frames, e.split, e.speaker) for e in a.examples]
    assert key == [(e.id, e.text, e.text_ids, e.frames, e.split, e.speaker) for e in b.examples]
    codes_a = {e.id: e.load_codes().numpy() for e in a.examples}
    codes_b = {e.id: e.load_codes().numpy() for e in b.examples}
    assert codes_a.keys() == codes_b.keys()
    assert all(np.array_equal(codes_a[i], codes_b[i]) for i in codes_a)
    for name in ("total", "kept", "train", "val", "hours", "skipped", "items", "speakers", "speaker_clips"):
        assert a.report[name] == b.report[name], name
    if counts:
        assert a.report["encoded"] + a.report["cached"] == b.report["encoded"] + b.report["cached"]
