"""Training callback (``callbacks.eval``): every ``every_n_val`` validations, synthesize a few sentences
of the evaluation set with the model being trained, score them, and log ``eval/wer``, ``eval/cer``,
``eval/eos_rate``, ``eval/duration_ratio`` (and ``eval/sim`` with ``speaker_ref``, ``eval/mos`` when
asked) to every logger (CSV, W&B); the wavs and an eval_report go to ``<run dir>/eval/step<N>/``, the wavs to W&B as audio.

Runs on global rank 0 only, on the unwrapped model (skipped under FSDP, like ``AudioSamples``). The
scoring backends load once, at the first evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from elise.callbacks import EveryNValidations, evaluating
from elise.evaluate.report import write_report
from elise.evaluate.score import Scorer
from elise.evaluate.sources import read_eval_set
from elise.evaluate.synth import synthesize_lines
from elise.synthesis.engine import Settings, Synthesizer

log = logging.getLogger("elise.evaluate")
LOGGED = {"wer": "eval/wer", "cer": "eval/cer", "sim": "eval/sim", "mos": "eval/mos", "eos_rate": "eval/eos_rate",
          "duration_ratio": "eval/duration_ratio"}  # fmt: skip


class EvalCallback(EveryNValidations):
    """Intelligibility, voice match and stopping of the model in training, on ``num_sentences`` lines."""

    def __init__(self, codec: Mapping[str, Any], every_n_val: int = 5, num_sentences: int = 4,
                 eval_set: str = "default", metrics: Sequence[str] = ("wer", "cer", "sim", "eos", "duration_ratio"),
                 asr: str = "auto", asr_model: str | None = None, sim: str = "auto", sim_model: str | None = None,
                 mos: str = "none", speaker_ref: Sequence[str] | str | None = None, max_audio_seconds: float = 10.0,
                 seed: int = 0):  # fmt: skip
        super().__init__(codec, every_n_val, num_sentences)
        self.eval_set = str(eval_set)
        self.speaker_ref = [str(speaker_ref)] if isinstance(speaker_ref, str) else list(speaker_ref or [])
        wanted = [
            str(m) for m in metrics if str(m) != "sim" or self.speaker_ref
        ]  # SIM needs a reference voice
        self.scorer_args = (wanted, asr, asr_model, sim, sim_model, mos)
        self.settings = Settings(seed=int(seed), max_audio_seconds=float(max_audio_seconds))
        self._scorer: Scorer | None = None

    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(*self.scorer_args)
        return self._scorer

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer):
            return
        step = trainer.global_step
        report = self.evaluate(pl_module, Path(trainer.default_root_dir) / "eval" / f"step{step:07d}")
        metrics = {name: report["summary"][key]["mean"] for key, name in LOGGED.items()
                   if report["summary"].get(key, {}).get("mean") is not None}  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                rows = report["items"]
                logger.log_audio("eval/audio", [r["wav"] for r in rows], step=step,
                                 caption=[f"{r['text']} -> {r.get('transcript', '')}" for r in rows])  # fmt: skip
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    def evaluate(self, pl_module: pl.LightningModule, out: Path) -> dict[str, Any]:
        """Synthesize and score the first ``num_sentences`` lines with the module's model; returns the report."""
        from elise.checkpoints import tokenizer_from_checkpoint

        model = cast(Any, pl_module).model
        device = next(model.parameters()).device
        tokenizer = tokenizer_from_checkpoint({"elise_tokenizer_json": getattr(pl_module, "tokenizer_json", None),
                                               "hyper_parameters": dict(pl_module.hparams)})  # fmt: skip
        synth = Synthesizer(model, tokenizer, self.codec(device), self.settings)
        lines = read_eval_set(self.eval_set, self.num_sentences)
        with evaluating(model):
            items = synthesize_lines(synth, lines, out, [(None, None)], 30.0, progress=False)
        report = self.scorer().score(items, self.speaker_ref or None)
        write_report(report, out)
        return report
