"""Training callbacks: audio samples of fixed validation sentences, a checkpoint on SIGTERM, the progress bar."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from elise.codec.base import Codec
from elise.data.audio import write_wav
from elise.model import CSM
from elise.synthesis.engine import Request, Settings, Synthesizer
from elise.synthesis.text import FRAME_RATE

log = logging.getLogger(__name__)


def progress_bar(refresh_rate: int = 1, plain_refresh_rate: int = 50) -> ProgressBar:
    """Steps out of max_steps; refreshed rarely when stdout is a file (SLURM logs)."""
    from elise.progress import StepProgressBar

    return StepProgressBar(refresh_rate=refresh_rate if sys.stdout.isatty() else plain_refresh_rate)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the final state of a run.

    Lightning's own ``save_last`` skips the save at the end of training once any checkpoint was
    written (e.g. every 10k steps with max_steps=15k leaves last.ckpt at step 10k).

    ``keep_last=K`` keeps only the K newest step checkpoints of ``dirpath`` (files matching
    ``filename``; ``last``, ``best`` and SIGTERM checkpoints are not step checkpoints), those of an
    earlier run that is being resumed included; ``None`` keeps them all.
    """

    def __init__(self, *args: Any, keep_last: int | None = None, **kwargs: Any):
        # a resumed run that redoes step N (e.g. after falling back from a corrupt checkpoint)
        # overwrites stepN.ckpt and last.ckpt with the same state instead of adding "-v1" copies
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        if keep_last is not None and int(keep_last) < 1:
            raise ValueError(f"callbacks.checkpoint.keep_last must be >= 1 or null, got {keep_last}")
        self.keep_last = None if keep_last is None else int(keep_last)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep_last is not None and Path(filepath).stem != self.CHECKPOINT_NAME_LAST:
            self._prune(trainer)

    def _prune(self, trainer: pl.Trainer) -> None:
        pattern = re.sub(r"\{[^}]*\}", "*", self.filename or "*") + self.FILE_EXTENSION
        steps = [p for p in Path(str(self.dirpath)).glob(pattern) if not p.is_symlink()]
        steps.sort(key=lambda p: (p.stat().st_mtime, p.name))
        keep = {str(p) for p in steps[-self.keep_last :]} if self.keep_last else set()
        for old in steps:
            if str(old) not in keep and not self._links_to(old):
                trainer.strategy.remove_checkpoint(str(old))  # rank 0 only

    def _links_to(self, path: Path) -> bool:
        """``last.ckpt`` may be a symlink to a step checkpoint (``save_last: link``): keep its target."""
        last = Path(str(self.dirpath)) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        return last.is_symlink() and last.resolve() == path.resolve()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.save_last
            and not getattr(trainer, "fast_dev_run", False)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class EveryNValidations(Callback):
    """Base of the callbacks that synthesize with the model in training every ``every_n_val``
    validations (``AudioSamples``, ``elise.evaluate.callback.EvalCallback``): on global rank 0 only,
    on the unwrapped model (no collectives: other ranks wait at the next gradient sync), never under
    FSDP, where no rank holds the whole model; one codec, built at the first use."""

    def __init__(self, codec: Mapping[str, Any], every_n_val: int, num_sentences: int):
        self.codec_cfg = dict(codec)
        self.every_n_val, self.num_sentences = int(every_n_val), int(num_sentences)
        self._codec: Codec | None = None
        self._runs = 0

    def due(self, trainer: pl.Trainer) -> bool:
        """Counts this validation; True when this rank synthesizes now."""
        if trainer.sanity_checking or self.num_sentences <= 0:
            return False
        self._runs += 1
        if self._runs % max(self.every_n_val, 1) or not trainer.is_global_zero:
            return False
        return "FSDP" not in type(trainer.strategy).__name__

    def codec(self, device: torch.device) -> Codec:
        if self._codec is None:
            from elise.codec import build_codec

            self._codec = build_codec(**self.codec_cfg).eval()
        return self._codec.to(device)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AudioSamples(EveryNValidations):
    """Every ``every_n_val`` validation runs, synthesize the first ``num_sentences`` validation
    sentences with the synthesis engine at the settings users get from ``synthesize.py`` (sampled,
    EOS-ended, at most ``max_frames``), and write ``<run dir>/samples/step<N>_<i>.wav`` (24 kHz);
    logged to W&B as audio when W&B is on.

    Runs on global rank 0 only, on the unwrapped CSM (no collectives, so other ranks just wait at
    the next gradient sync). Skipped under FSDP, where no rank holds the whole model.
    """

    def __init__(
        self,
        codec: Mapping[str, Any],
        every_n_val: int = 1,
        num_sentences: int = 2,
        max_frames: int = 125,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
    ):
        super().__init__(codec, every_n_val, num_sentences)
        self.settings = Settings(seed=int(seed), max_audio_seconds=int(max_frames) / FRAME_RATE)
        if temperature is not None:
            self.settings.temperature = float(temperature)
        if top_k is not None:
            self.settings.top_k = int(top_k)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer):
            return
        val_set = getattr(getattr(trainer, "datamodule", None), "val_set", None)
        examples = list(getattr(val_set, "examples", []) or [])[: self.num_sentences]
        if not examples:
            return
        paths = self.write_samples(
            cast(CSM, pl_module.model), examples, Path(trainer.default_root_dir), trainer.global_step
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_audio(
                    "samples",
                    [str(p) for p in paths],
                    step=trainer.global_step,
                    caption=[e.text for e in examples],
                )

    def write_samples(self, model: CSM, examples: list, run_dir: Path, step: int) -> list[Path]:
        """Synthesize and write one wav per example; returns the paths."""
        device = next(model.parameters()).device
        synth = Synthesizer(model, None, self.codec(device), self.settings)
        requests = [Request(e.text, prompt_ids=list(e.text_ids)) for e in examples]
        with evaluating(model):
            results = synth.synthesize(requests)
        out_dir = run_dir / "samples"
        paths = []
        for i, result in enumerate(results):
            path = out_dir / f"step{step:07d}_{i}.wav"
            write_wav(path, result.audio.numpy(), result.sample_rate)
            paths.append(path)
        log.info("wrote %d audio samples to %s", len(paths), out_dir)
        return paths


class SaveOnSigterm(Callback):
    """On SIGTERM (preemption, ``scancel``), save ``<dirpath>/sigterm-step<N>.ckpt`` before exiting.

    Lightning's signal connector only flags the signal; the fit loop then raises
    ``SIGTERMException`` at the end of the current batch on every rank (rank 0 broadcasts the
    flag under DDP), so every rank reaches ``on_exception`` and ``trainer.save_checkpoint`` (a
    collective under FSDP) runs on all of them: no deadlock.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.saved: str | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path = dirpath / f"sigterm-step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(str(path), weights_only=False)  # full state: optimizer, loops, sampler
        self.saved = str(path)
        if trainer.is_global_zero:
            print(f"SIGTERM: saved {path}; resume with ckpt_path={path}", file=sys.stderr, flush=True)


class BatchLog(Callback):
    """Appends ``<step> <id,id,...>`` per training batch to ``<run dir>/batches_rank<R>.txt``:
    which clips each rank trained on (debugging data order, DDP sharding, resumes). Off by default."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        path = Path(trainer.default_root_dir) / f"batches_rank{trainer.global_rank}.txt"
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{trainer.global_step} {','.join(batch['ids'])}\n")
