"""The training progress bar counts optimizer steps out of ``trainer.max_steps`` (Lightning's counts
the batches of the current epoch, which says nothing about how far a run is)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """``step 120/50000`` across epochs and resumes, with the logged metrics as postfix."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = 0
        bar.set_description(f"step (epoch {trainer.current_epoch})")
        _update_n(bar, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
