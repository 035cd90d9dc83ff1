"""The LightningModule: a CSM, its loss, per-codebook metrics, AdamW + warmup/cosine.

Only primitives go into ``hparams`` (model config dict, tokenizer spec, optim and loss settings),
so ``EliseModule.load_from_checkpoint(path)`` and ``elise.checkpoints.load_model(path)`` rebuild
the network from the checkpoint alone. The CSM lives under ``self.model`` (state-dict prefix
``model.``), as ``elise.checkpoints`` expects.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torchmetrics import Metric

from elise.checkpoint_error import CheckpointError
from elise.config import conf_defaults
from elise.layout import NUM_CODEBOOKS
from elise.model import CSMConfig, build_model
from elise.model.lora import LoRAConfig, add_lora, is_lora_key
from elise.model.loss import LossOutput, csm_loss
from elise.optim import build_optimizer, optim_settings, schedule_follows_max_steps


class PerCodebookMean(Metric):
    """Running per-codebook mean of a quantity: sums [32] and counts [32], summed across ranks.

    Fed vectorized sums (one update per batch, not 32), so accuracy = correct / total and
    loss = sum(CE) / frames over everything seen since the last reset.
    """

    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, num_codebooks: int = NUM_CODEBOOKS, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(num_codebooks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_codebooks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, counts: Tensor) -> None:
        self.total += sums.detach().to(self.total)  # [32]
        self.count += counts.detach().to(self.count)  # [32]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)  # [32]


def codebook_sums(out: LossOutput) -> tuple[Tensor, Tensor, Tensor]:
    """(correct [32], loss sums [32], counts [32]) of one batch; codebook 0 counts every target
    frame, codebooks 1..31 the decoder's frames."""
    correct = torch.cat(
        [(out.preds0 == out.target0).sum().reshape(1), (out.preds == out.targets).sum(0)]
    )  # [32]
    counts = torch.tensor(
        [out.num_frames] + [out.num_decoder_frames] * (NUM_CODEBOOKS - 1), device=correct.device
    )
    return correct.float(), out.per_codebook_loss.float() * counts, counts.float()


def frame_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (seed, step, micro-batch, rank): resumed runs
    draw the same decoder frames at the same step."""
    seed = int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


class EliseModule(pl.LightningModule):
    """Backbone + depth decoder trained with ``elise.model.loss.csm_loss``.

    Args:
        model: CSMConfig as a dict (the Hydra ``model`` group or a checkpoint's ``hparams.model``).
        tokenizer: ``"bytes"`` or the HF tokenizer spec (a path); recorded for synthesis.
        optim: lr, min_lr, warmup_steps, weight_decay, betas, eps, max_bad_steps (``elise.optim``;
            missing keys from ``conf/optim/adamw.yaml``).
        loss: decoder_fraction, val_decoder_fraction, backbone_weight, decoder_weight (missing keys
            from ``conf/loss/default.yaml``).
        total_steps: optimizer steps of the cosine schedule (``trainer.max_steps``).
        seed: seeds the decoder-frame draws.
        freeze_backbone: backbone + text embeddings get no gradients (nor optimizer state).
        tokenizer_json: full tokenizer.json text, stored in the checkpoint (not in hparams).
        codec: the codec it trains on (``elise.codec.codec_identity``); recorded for synthesis/export.
        speakers: speaker name -> id of the training data; recorded so ``speaker=<name>`` resolves.
        lora: ``elise.model.lora.LoRAConfig`` as a dict: every base weight frozen, adapters train, and
            checkpoints hold the adapters only (``elise.checkpoints`` finds the base from ``lora_base``).
        lora_base: the base weights' record ``{"path", "sha256"}`` (``init_from``).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        tokenizer: str = "bytes",
        optim: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        total_steps: int = 1000,
        seed: int = 0,
        freeze_backbone: bool = False,
        tokenizer_json: str | None = None,
        codec: Mapping[str, Any] | None = None,
        speakers: Mapping[str, int] | None = None,
        lora: Mapping[str, Any] | None = None,
        lora_base: Mapping[str, str] | None = None,
    ):
        super().__init__()
        model_dict = CSMConfig.from_dict(dict(model)).to_dict()  # validated, primitives only
        loss_cfg = {k: float(v) for k, v in conf_defaults("loss/default").items()}
        loss_cfg.update({k: float(v) for k, v in dict(loss or {}).items() if v is not None})
        optim_cfg = optim_settings(optim)
        optim_cfg["betas"] = list(optim_cfg["betas"])
        self.save_hyperparameters(
            {
                "model": model_dict,
                "tokenizer": str(tokenizer),
                "optim": optim_cfg,
                "loss": loss_cfg,
                "total_steps": int(total_steps),
                "seed": int(seed),
                "freeze_backbone": bool(freeze_backbone),
                "codec": dict(codec) if codec else None,
                "speakers": {str(k): int(v) for k, v in dict(speakers or {}).items()},
                "lora": LoRAConfig.from_dict(lora).to_dict() if lora else None,
                "lora_base": dict(lora_base) if lora_base else None,
            }
        )
        self.loss_cfg, self.optim_cfg = loss_cfg, optim_cfg
        self.seed, self.total_steps = int(seed), int(total_steps)
        self.model = build_model(model_dict)
        self.tokenizer_json = tokenizer_json
        if freeze_backbone:
            self.freeze_backbone()
        self.lora = LoRAConfig.from_dict(lora) if lora else None
        if self.lora is not None:
            add_lora(self.model, self.lora)  # its checkpoints hold the adapters, not the (frozen) base
        # train metrics cover the steps since the last log on this rank: no sync needed
        self.train_acc = PerCodebookMean(sync_on_compute=False)
        self.train_cb_loss = PerCodebookMean(sync_on_compute=False)
        self.val_acc = PerCodebookMean()
        self.val_cb_loss = PerCodebookMean()
        self.tokens_seen = 0  # non-padding rows, all ranks, up to the last log
        self._pending_tokens = 0  # this rank's rows since the last log
        self._micro = (-1, 0)  # (global_step, micro-batch index) for accumulation
        # non-finite guard: a step whose loss or gradient is NaN/Inf is skipped (counted); after
        # max_bad_steps in a row training stops (nonfinite_stop holds the message)
        self.max_bad_steps = int(self.optim_cfg["max_bad_steps"])
        self.skipped_steps = 0
        self.bad_streak = 0
        self.nonfinite_stop: str | None = None

    @property
    def strict_loading(self) -> bool:
        """Strict for adapter checkpoints too (``on_load_checkpoint`` adds the frozen base they lack), except
        under FSDP, whose strategy loads a checkpoint's weights before that hook runs."""
        fsdp = "FSDP" in type(getattr(self._trainer, "strategy", None)).__name__
        return self._strict_loading in (None, True) and not (getattr(self, "lora", None) is not None and fsdp)

    @strict_loading.setter
    def strict_loading(self, value: bool) -> None:
        self._strict_loading = value

    def freeze_backbone(self) -> None:
        """Freeze the backbone blocks and text embeddings (audio embeddings are shared with the decoder)."""
        for part in (self.model.backbone, self.model.text_embeddings):
            part.requires_grad_(False)

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        """Copy CSM weights (``init_from``), strictly: a mismatch is an error, not a silent partial load
        (with LoRA: every base weight, the adapters keep their initialisation)."""
        if self.lora is None:
            self.model.load_state_dict(dict(state), strict=True)
            return
        missing, unexpected = self.model.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if not is_lora_key(k)]
        if missing or unexpected:
            raise RuntimeError(
                f"base weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    # ---- steps -------------------------------------------------------------------------------

    def _loss(self, batch: dict, fraction: float, generator: torch.Generator) -> LossOutput:
        lc = self.loss_cfg
        return csm_loss(
            self.model,
            batch["tokens"],
            batch["mask"],
            fraction,
            lc["backbone_weight"],
            lc["decoder_weight"],
            generator,
            batch.get("target"),
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        step = self.global_step
        micro = self._micro[1] + 1 if self._micro[0] == step else 0
        self._micro = (step, micro)
        gen = frame_generator(self.seed, step, micro, self.global_rank)
        out = self._loss(batch, self.loss_cfg["decoder_fraction"], gen)
        frames = out.num_frames
        self.log("train/loss", out.loss, prog_bar=True, batch_size=frames)
        self.log("train/backbone_loss", out.backbone_loss, batch_size=frames)
        self.log("train/decoder_loss", out.decoder_loss, batch_size=frames)
        correct, loss_sums, counts = codebook_sums(out)
        self.train_acc.update(correct, counts)
        self.train_cb_loss.update(loss_sums, counts)
        self._pending_tokens += int(batch["mask"].any(-1).sum())
        last_micro = (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
        if last_micro and self.trainer._logger_connector.should_update_logs:
            self._log_window()
        return out.loss

    def _log_window(self) -> None:
        """Per-codebook accuracy/loss over the steps since the last log, lr, tokens seen."""
        pending = torch.tensor(float(self._pending_tokens), device=self.device)
        self.tokens_seen += int(self.trainer.strategy.reduce(pending, reduce_op="sum").item())
        self._pending_tokens = 0
        acc, cb_loss = self.train_acc.compute(), self.train_cb_loss.compute()
        self.train_acc.reset()
        self.train_cb_loss.reset()
        logs = {f"train/acc_cb{k}": acc[k].float() for k in range(NUM_CODEBOOKS)}
        logs.update({f"train/loss_cb{k}": cb_loss[k].float() for k in range(NUM_CODEBOOKS)})
        lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        logs["train/lr"] = torch.tensor(lr, device=self.device)
        logs["train/tokens_seen"] = torch.tensor(float(self.tokens_seen), device=self.device)
        self.log_dict(logs, on_step=True, on_epoch=False)

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        gen = frame_generator(self.seed, -1, batch_idx, self.global_rank)
        out = self._loss(batch, self.loss_cfg["val_decoder_fraction"], gen)
        for name, value in (
            ("loss", out.loss),
            ("backbone_loss", out.backbone_loss),
            ("decoder_loss", out.decoder_loss),
        ):
            self.log(
                f"val/{name}",
                value,
                prog_bar=name == "loss",
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=out.num_frames,
            )
        correct, loss_sums, counts = codebook_sums(out)
        self.val_acc.update(correct, counts)
        self.val_cb_loss.update(loss_sums, counts)
        return out.loss

    def on_validation_epoch_end(self) -> None:
        acc, cb_loss = self.val_acc.compute(), self.val_cb_loss.compute()  # synced across ranks
        self.val_acc.reset()
        self.val_cb_loss.reset()
        logs = {f"val/acc_cb{k}": acc[k].float() for k in range(NUM_CODEBOOKS)}
        logs.update({f"val/loss_cb{k}": cb_loss[k].float() for k in range(NUM_CODEBOOKS)})
        # already equal on every rank: sync_dist only says so to Lightning (one warning per key otherwise)
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True)

    # ---- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        # a gradient scaler (16-mixed) plus clipping: Lightning must unscale before clipping, which an
        # optimizer that unscales inside its step (fused) does not allow
        scaled = (
            self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        )
        clipped = self._trainer is not None and bool(self.trainer.gradient_clip_val)
        opt, sched = build_optimizer(self.model, self.optim_cfg, self.total_steps, not (scaled and clipped))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and gradient_clip_val:
            # bf16-mixed scales nothing: Lightning's refusal to clip for an optimizer that unscales
            # gradients inside its step (fused AdamW) is about a scaler, so clip as plain fp32 does
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, float(gradient_clip_val), algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip an optimizer step whose (accumulated, unscaled) gradients hold NaN/Inf.

        Runs after the backward of the last micro-batch and before gradient clipping. A NaN loss
        gives NaN gradients, so checking the gradients covers both. The flag is summed over ranks
        (FSDP shards gradients; every rank must skip together). Skipping sets every gradient to
        None: AdamW then leaves those parameters and their moments untouched (no weight decay
        either), so a skipped step changes nothing but the step counter and the lr schedule.
        Under 16-mixed the GradScaler already skips overflowing steps; they are counted only.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        bad = torch.zeros((), device=self.device)
        if grads:
            peak = torch.stack(torch._foreach_norm(grads, float("inf")))  # [n] max |g| per tensor
            bad = (~peak.isfinite().all()).float().to(self.device)
        bad = self.trainer.strategy.reduce(bad, reduce_op="sum")  # a collective: every rank calls it
        if float(bad) > 0:
            if getattr(self.trainer.precision_plugin, "scaler", None) is None:
                for p in self.parameters():
                    p.grad = None
            self.skipped_steps += 1
            self.bad_streak += 1
            if self.bad_streak >= self.max_bad_steps > 0:
                first = self.global_step - self.bad_streak + 1
                self.nonfinite_stop = (
                    f"stopped: {self.bad_streak} consecutive steps (from step {first}) had a NaN/Inf "
                    f"loss or gradient (optim.max_bad_steps={self.max_bad_steps}); the weights are "
                    f"those from before step {first}"
                )
                self.trainer.should_stop = True
        else:
            self.bad_streak = 0
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    # ---- checkpoint extras -------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_json:
            checkpoint["elise_tokenizer_json"] = self.tokenizer_json
        world = self.trainer.world_size if self._trainer is not None else 1
        checkpoint["elise_tokens_seen"] = int(self.tokens_seen + self._pending_tokens * world)
        checkpoint["elise_rng"] = rng_state()
        checkpoint["elise_nonfinite"] = [self.skipped_steps, self.bad_streak]
        if self.lora is not None:  # the adapters only: the base is found from hparams["lora_base"]
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if is_lora_key(k)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        schedule_follows_max_steps(checkpoint, self.total_steps)
        saved_base = (checkpoint.get("hyper_parameters") or {}).get("lora_base")
        base = self.hparams.get("lora_base")
        if self.lora is not None and saved_base and base and saved_base["sha256"] != base["sha256"]:
            raise CheckpointError(
                f"the checkpoint's adapters were trained on base {saved_base['path']} (sha256 "
                f"{saved_base['sha256'][:12]}), not init_from={base['path']} (sha256 {base['sha256'][:12]})"
            )
        if self.lora is not None and "state_dict" in checkpoint:  # the frozen base as init_from loaded it
            own = {k: v for k, v in self.state_dict().items() if not is_lora_key(k)}
            checkpoint["state_dict"] = own | dict(checkpoint["state_dict"])
        self.tokenizer_json = checkpoint.get("elise_tokenizer_json", self.tokenizer_json)
        self.tokens_seen = int(checkpoint.get("elise_tokens_seen", 0))
        self.skipped_steps, self.bad_streak = (int(v) for v in checkpoint.get("elise_nonfinite", [0, 0]))
        if self._trainer is not None and "elise_rng" in checkpoint:  # resuming, not loading for inference
            set_rng_state(checkpoint["elise_rng"])


def rng_state() -> dict[str, Any]:
    """torch / numpy / python RNG states as tensors and plain tuples (``weights_only``-loadable).

    Under DDP the checkpoint holds rank 0's states; elise's own randomness (decoder frames, batch
    order) is seeded per step and per rank, so no rank depends on them for an exact resume.
    """
    kind, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state(legacy=True))
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], has_gauss, gauss)
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
