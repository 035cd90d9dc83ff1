"""``train(cfg)``: build the module, data, callbacks, loggers and Trainer from the Hydra config, fit.

``main(cfg)`` (what ``train.py`` calls) turns user errors (data or codec weights that cannot be
fetched, a missing ``init_from``, a bad path) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from elise.callbacks import SaveOnSigterm
from elise.checkpoints import AtomicCheckpointIO, open_resume
from elise.config import trainer_precision
from elise.errors import EXIT_USER_ERROR, exit_with
from elise.module import EliseModule
from elise.precision import choose_precision
from elise.preflight import UserError, cpu_processes_per_node, on_cpu, preflight
from elise.progress import StepProgressBar

log = logging.getLogger("elise.train")
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a terminated job
EXIT_SIGINT = 130  # 128 + SIGINT (Ctrl-C)
EXIT_NONFINITE = 3  # stopped after too many consecutive non-finite steps (a checkpoint was saved)


class NonFiniteStop(RuntimeError):
    """Training stopped: ``optim.max_bad_steps`` consecutive steps had a NaN/Inf loss or gradient."""


# ---- paths --------------------------------------------------------------------------------------


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra run dir (``hydra.run.dir``, or the job's dir in a sweep); created if needed."""
    from hydra.core.hydra_config import HydraConfig

    name = None
    if HydraConfig.initialized():
        name = HydraConfig.get().runtime.output_dir
    if not name and "hydra" in cfg:  # composed with return_hydra_config=True (tests, elise.demo)
        name = OmegaConf.select(cfg, "hydra.run.dir")
    path = Path(name or f"outputs/train/runs/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


# ---- pieces -------------------------------------------------------------------------------------


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_config(cfg: DictConfig) -> None:
    """``preflight`` (the CLI ran it already, before the run dir; Python callers get it here), then
    ``trainer.precision`` in Lightning's spelling."""
    preflight(cfg)
    with open_dict(cfg):
        cfg.trainer.precision = trainer_precision(cfg.trainer.get("precision"))
    if on_cpu(cfg.trainer) and cfg.trainer.precision.startswith("bf16"):
        log.warning(
            "trainer.precision=%s on a CPU: faster than fp32 only where the CPU has bf16 matrix units "
            "(AMX, avx512_bf16) and the model is wide, else several times slower; "
            "trainer.precision=auto measures it on this machine",
            cfg.trainer.precision,
        )


def resolve_tokenizer(cfg: DictConfig, model_cfg: dict, loaded: Any | None, run_dir: Path) -> tuple[Any, str]:
    """The tokenizer (``tokenizer=`` wins, else init_from's, else bytes) and the spec the
    datamodule reads (a path or ``"bytes"``; a tokenizer stored in a checkpoint is written out)."""
    from elise.text import HFTokenizer, build_tokenizer

    tokenizer = loaded.tokenizer if loaded is not None else None
    if cfg.get("tokenizer") is not None:
        tokenizer = build_tokenizer(str(cfg.tokenizer))  # FileNotFoundError: one-line message
    if tokenizer is None:
        tokenizer = build_tokenizer("bytes")
        if int(model_cfg["text_vocab_size"]) > 1024:
            log.warning(
                "no tokenizer given: using the byte tokenizer (its ids fit the %d-id text table); "
                "pass tokenizer=/path/to/tokenizer.json for the model's own vocabulary",
                model_cfg["text_vocab_size"],
            )
    if tokenizer.vocab_size > int(model_cfg["text_vocab_size"]):
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's text table has {model_cfg['text_vocab_size']}"
        )
    if not isinstance(tokenizer, HFTokenizer):
        return tokenizer, "bytes"
    if tokenizer.path is not None:
        return tokenizer, str(tokenizer.path)
    path = run_dir / "tokenizer.json"  # came from a checkpoint: the datamodule reads a file
    path.write_text(tokenizer.json, encoding="utf-8")
    return tokenizer, str(path)


def lora_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``lora`` group as a validated ``LoRAConfig`` dict (None without it); LoRA needs ``init_from``."""
    from elise.model.lora import LoRAConfig

    if not cfg.get("lora"):
        return None
    if not cfg.get("init_from"):
        raise UserError("lora adapts existing weights: pass init_from=<transformers dir or elise .ckpt>")
    try:
        return LoRAConfig.from_dict(_container(cfg.lora)).to_dict()
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from err


def build_module(
    cfg: DictConfig, model_cfg: dict, tokenizer: Any, spec: str, loaded: Any | None, datamodule: Any = None
) -> EliseModule:
    """The LightningModule: from scratch, or with the weights of ``init_from`` (a fresh schedule).

    It records the codec identity and the datamodule's speaker map in its hparams; with ``lora``, the
    adapter settings and ``init_from``'s path and sha256 (the base its checkpoints refer to)."""
    from elise.checkpoints import weights_sha256
    from elise.codec import codec_identity

    lora = lora_settings(cfg)
    base = None
    if lora:
        path = Path(str(cfg.init_from)).expanduser().resolve()
        base = {"path": str(path), "sha256": weights_sha256(path)}

    module = EliseModule(
        model=model_cfg,
        tokenizer=spec,
        optim=_container(cfg.optim),
        loss=_container(cfg.get("loss")),
        total_steps=max(int(cfg.trainer.get("max_steps", 1)), 1),
        seed=int(cfg.seed),
        freeze_backbone=bool(cfg.get("freeze_backbone", False)),
        tokenizer_json=getattr(tokenizer, "json", None),
        codec=codec_identity(str(cfg.codec.name), _container(cfg.codec)),
        speakers=dict(getattr(datamodule, "speakers", None) or {}),
        lora=lora,
        lora_base=base,
    )
    if lora:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log.info("lora: %d adapter parameters train (rank %d); base weights frozen", trainable, lora["rank"])
    if loaded is not None:
        module.load_weights(loaded.model.state_dict())
    return module


class VoiceEval(pl.Callback):
    """``voice_eval`` (experiment=voice): ``elise.evaluate`` on held-out clips of the new voice, with the
    base when training starts and with the trained model at the end (``after``), both taken from the
    module in memory (adapters merged into a copy), not read again from disk: their texts synthesized,
    WER against them and SIM to the held-out audio (the codec's reconstruction of their codes). Reports
    under ``<run dir>/voice_eval/{before,after}``; ``line()`` compares them."""

    def __init__(self, node: Any, base: str, codec: dict[str, Any], run_dir: Path, tokenizer: Any):
        self.clips, self.metrics = (
            int(node.get("clips", 8)),
            [str(m) for m in node.get("metrics", ["wer", "sim"])],
        )
        self.asr, self.sim = str(node.get("asr", "auto")), str(node.get("sim", "auto"))
        self.base, self.codec, self.out, self.tokenizer = base, codec, run_dir / "voice_eval", tokenizer
        self.results: dict[str, dict[str, float]] = {}
        self.texts: list[str] = []
        self.refs: list[str] = []
        self.scorer: Any = None
        self.device = "cpu"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if "FSDP" in type(trainer.strategy).__name__:  # a forward on rank 0 alone would wait for the others
            log.warning(
                "voice_eval: skipped under FSDP (evaluate the checkpoints with python -m elise.evaluate)"
            )
            return
        from elise.codec import build_codec
        from elise.data.audio import write_wav
        from elise.evaluate.score import Scorer

        examples = list(getattr(trainer.datamodule.val_set, "examples", []) or [])[: self.clips]  # type: ignore[attr-defined]
        if not examples:
            log.warning("voice_eval: no held-out clips (data.val_count=0?): no before/after evaluation")
            return
        codec = build_codec(**self.codec)
        for e in examples:
            wav = codec.decode(e.load_codes()[None].to(codec_device(codec)))  # [1, 1, N]
            path = self.out / "held_out" / f"{e.id}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, wav.reshape(-1).float().cpu().numpy(), codec.sample_rate)
            self.refs.append(str(path))
        self.texts = [e.text for e in examples]
        self.device = pl_module.device.type
        self.scorer = Scorer(self.metrics, self.asr, None, self.sim, None, "auto", self.device)
        if trainer.global_step > 0:  # resumed: the module holds trained weights; the base is on disk
            self.results["before"] = self.evaluate(self.base, "before")
        else:
            name = f"init_from={self.base} (in memory, step {trainer.global_step})"
            self.results["before"] = self.evaluate(self.in_memory(pl_module, name), "before")

    def in_memory(self, pl_module: pl.LightningModule, name: str) -> Any:
        """The module's CSM as ``load_model`` would give it: a copy, adapters merged, in eval mode."""
        import copy

        from elise.checkpoints import Loaded
        from elise.model.lora import merge_lora

        hp = pl_module.hparams
        model = merge_lora(copy.deepcopy(pl_module.model)).eval()  # type: ignore[arg-type]
        return Loaded(model, self.tokenizer, "elise", {"name": name}, codec=dict(hp["codec"]) if hp.get("codec") else None,
                      speakers={str(k): int(v) for k, v in dict(hp.get("speakers") or {}).items()})  # fmt: skip

    def evaluate(self, loaded: Any, name: str) -> dict[str, float]:
        from elise.evaluate.synth import evaluate_checkpoint

        report = evaluate_checkpoint(loaded, self.texts, self.out / name, speaker_ref=self.refs, scorer=self.scorer,
                                     device=self.device, seed=0, progress=False)  # fmt: skip
        return {
            k: float(v["mean"]) for k, v in report["summary"].items() if isinstance(v, dict) and "mean" in v
        }

    def after(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scorer is not None:
            name = f"the trained model (in memory, step {trainer.global_step})"
            self.results["after"] = self.evaluate(self.in_memory(pl_module, name), "after")

    def line(self) -> str:
        before, after = self.results.get("before", {}), self.results.get("after", {})
        pairs = ", ".join(f"{k} {before[k]:.3f} -> {after.get(k, float('nan')):.3f}" for k in before)
        return f"voice eval on {len(self.texts)} held-out clips (before -> after): {pairs or 'none'}"


def codec_device(codec: Any) -> torch.device:
    params = list(codec.parameters()) if hasattr(codec, "parameters") else []
    return params[0].device if params else torch.device("cpu")


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        cb = instantiate(node, _convert_="all")
        if getattr(cb, "dirpath", "unset") is None:
            cb.dirpath = str(run_dir / "checkpoints")
        log.debug("callback %s: %s", name, type(cb).__name__)
        callbacks.append(cb)
    return callbacks


def build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> list:
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        kwargs = {"save_dir": str(run_dir)} if node.get("save_dir") is None else {}
        lg = instantiate(node, _convert_="all", **kwargs)
        if resume_step is not None and hasattr(lg, "resume_from"):
            lg.resume_from(resume_step)  # keep metrics.csv rows logged before the checkpoint
        if hasattr(lg, "experiment") and "Wandb" in type(lg).__name__:
            plain = {k: _container(v) for k, v in cfg.items() if k != "hydra"}
            lg.log_hyperparams(plain)
        loggers.append(lg)
    return loggers


# ---- entry points -------------------------------------------------------------------------------


def train(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, float]:
    """Fit the model described by ``cfg``; returns the final logged metrics as floats.

    ``callbacks`` are added to the configured ones (tests use this to inject faults).
    """
    check_config(cfg)
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        return _train(cfg, callbacks)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(cfg: DictConfig, callbacks: list[pl.Callback] | None) -> dict[str, float]:
    from hydra.core.hydra_config import HydraConfig

    run_dir = run_dir_of(cfg)
    with open_dict(cfg):  # ${paths.output_dir} (checkpoint, logger dirs) is this run dir, Hydra-run or not
        cfg.paths.output_dir = str(run_dir)
    if not HydraConfig.initialized() and getattr(rank_zero_only, "rank", 0) == 0:
        # composed from Python (elise.demo, tests): no .hydra/config.yaml, so record the config here
        plain = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(plain), encoding="utf-8")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts; params stay fp32
    loaded, model_cfg = None, _container(cfg.model)
    lora_settings(cfg)  # a bad lora group fails before data and weights load
    if cfg.get("init_from"):
        from elise.checkpoints import load_model

        loaded = load_model(cfg.init_from)  # CheckpointError: one-line message
        model_cfg = loaded.model.cfg.to_dict()  # the weights' architecture, not the model group's
        log.info(
            "init_from=%s: %s weights, with their architecture and tokenizer", cfg.init_from, loaded.source
        )
    if cfg.trainer.precision == "auto":
        cpu = on_cpu(cfg.trainer)
        processes = (
            cpu_processes_per_node(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1) or 1) if cpu else 1
        )
        choice = choose_precision(model_cfg, cpu=cpu, processes=processes)
        log.info("trainer.precision=auto -> %s: %s", choice.precision, choice.reason)
        with open_dict(cfg):
            cfg.trainer.precision = choice.precision
    tokenizer, tokenizer_spec = resolve_tokenizer(cfg, model_cfg, loaded, run_dir)

    from elise.data.datamodule import EliseDataModule

    datamodule = EliseDataModule(cfg.data, cfg.codec, tokenizer_spec=tokenizer_spec, seed=int(cfg.seed))
    if getattr(rank_zero_only, "rank", 0) == 0:
        # encode + cache before building a large model: unavailable data or codec weights fail in
        # seconds. Lightning's own call on this rank is then a no-op (the report prints once).
        datamodule.prepare_data()
    module = build_module(cfg, model_cfg, tokenizer, tokenizer_spec, loaded, datamodule)
    del loaded
    resumed = open_resume(cfg.get("ckpt_path"), run_dir)  # the one read of the checkpoint file
    ckpt_path, start_step = (resumed[0], int(resumed[1].get("global_step", 0))) if resumed else (None, 0)
    checkpoint_io = AtomicCheckpointIO()  # tmp file + fsync + rename
    if resumed:
        # the checkpoint I/O drops it once Lightning has loaded it (a rotated last.ckpt frees its space)
        checkpoint_io.hold(*resumed)
        del resumed
    all_callbacks = build_callbacks(cfg, run_dir) + list(callbacks or [])
    voice_eval = None
    if cfg.get("voice_eval") and cfg.get("init_from"):
        codec = _container(cfg.codec)
        voice_eval = VoiceEval(cfg.voice_eval, str(cfg.init_from), codec, run_dir, tokenizer)
        all_callbacks.append(voice_eval)
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        all_callbacks = [c for c in all_callbacks if not isinstance(c, ProgressBar)]
    elif not any(isinstance(c, ProgressBar) for c in all_callbacks):
        all_callbacks.append(StepProgressBar())
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        _convert_="all",
        callbacks=all_callbacks,
        logger=build_loggers(cfg, run_dir, start_step if ckpt_path else None) or False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # the batch sampler is rank-aware already
        plugins=[checkpoint_io],
    )
    try:
        with ctrl_c_stops_at_step_end(trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        saved = next((cb.saved for cb in all_callbacks if isinstance(cb, SaveOnSigterm) and cb.saved), None)
        if saved and trainer.is_global_zero:
            print(f"resume: {resume_command(run_dir, saved)}", file=sys.stderr, flush=True)
        interrupted = getattr(trainer, "_elise_ctrl_c", False)
        raise SystemExit((EXIT_SIGINT if interrupted else EXIT_SIGTERM) if saved else 1) from None
    if module.nonfinite_stop:
        # every skipped step left the weights and optimizer state as they were: this is the state
        # from before the first bad step (saved whatever the checkpoint callbacks are)
        path = run_dir / "checkpoints" / f"nonfinite-step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(str(path), weights_only=False)
        raise NonFiniteStop(f"{module.nonfinite_stop}; saved {path}")
    if trainer.global_step == start_step < int(cfg.trainer.max_steps):
        data = cfg.data
        raise UserError(
            "no training step ran: the training split has no batches (every item excluded by "
            f"data.max_tokens={data.get('max_tokens')}, data.min_seconds={data.get('min_seconds')}, "
            f"data.max_seconds={data.get('max_seconds')}? see the data report above)"
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if trainer.is_global_zero:
        text = summary(trainer, cfg, run_dir, metrics)
        if voice_eval is not None:
            voice_eval.after(trainer, module)
            text += "\n" + voice_eval.line()
        print(text, flush=True)
    return metrics


def resume_command(run_dir: Path, ckpt: str, *extra: str) -> str:
    """The command line that continues this run from ``ckpt`` (this run's overrides, same run dir)."""
    from hydra.core.hydra_config import HydraConfig

    keep = []
    replaced = ("ckpt_path=", "hydra.run.dir=", "hydra.job.name=", *(e.split("=")[0] + "=" for e in extra))
    if HydraConfig.initialized():
        keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(replaced)]
    args = [*keep, f"hydra.run.dir={run_dir}", f"ckpt_path={ckpt}", *extra]
    return " ".join(["python train.py", *(shlex.quote(a) for a in args)])


def summary(trainer: pl.Trainer, cfg: DictConfig, run_dir: Path, metrics: dict[str, float]) -> str:
    """What a finished run did and how to go on: steps, final losses, checkpoint, resume, synthesize."""
    losses = ", ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.endswith("loss"))
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    lines = [
        f"trained {trainer.global_step} steps (trainer.max_steps={cfg.trainer.max_steps}); {losses or 'no loss logged'}",
        f"run dir: {run_dir}",
    ]
    if ckpt and cfg.get("lora"):
        mb = Path(ckpt).stat().st_size / 1e6  # adapters + their AdamW state, not the base
        lines.append(
            f"LoRA checkpoint: {mb:.1f} MB (adapters over base init_from={cfg.init_from}, sha256 recorded)"
        )
    if ckpt:
        lines += [
            f"checkpoint: {ckpt}",
            f"continue: {resume_command(run_dir, ckpt, 'trainer.max_steps=<more>')}",
            # no codec=: synthesis uses the codec this checkpoint records
            f"synthesize: python synthesize.py ckpt={shlex.quote(ckpt)} text='Hello there.'",
        ]
    return "\n".join(lines)


@contextmanager
def ctrl_c_stops_at_step_end(trainer: pl.Trainer) -> Iterator[None]:
    """The first Ctrl-C finishes the current step and saves a checkpoint as SIGTERM does (Lightning's
    own handling exits 1 without one); a second Ctrl-C aborts at once (exit 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if getattr(trainer, "_elise_ctrl_c", False):
            print("\nCtrl-C again: aborted without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_SIGINT)
        trainer._elise_ctrl_c = True  # type: ignore[attr-defined]
        print(
            "\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )
        trainer._signal_connector.received_sigterm = True  # the fit loop stops at the step's end

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your input" (imported lazily: the codec pulls in nothing heavy here)."""
    from elise.checkpoints import CheckpointError
    from elise.codec import CodecUnavailable
    from elise.data.sources import DataUnavailable

    types: list[type[BaseException]] = [UserError, CheckpointError, CodecUnavailable, DataUnavailable]
    types += [MissingMandatoryValue, FileNotFoundError]
    try:
        from elise.data.context import ContextError
        from elise.data.prepare import BadItem

        types += [BadItem, ContextError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def quiet_lightning() -> None:
    """Drop Lightning's advertisement for its cloud logger and its own deprecation of ``LeafSpec``
    (raised inside Lightning's ``_pytree`` on torch >= 2.10, nothing elise can change)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger_tip)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def main(cfg: DictConfig) -> float | None:
    """``train.py``'s body: train, print one line and exit 2 on user errors; return the metric a
    sweeper optimizes (``optimized_metric``)."""
    quiet_lightning()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # the batch sampler resumes exactly (see elise.data.datamodule), whatever Lightning thinks
    warnings.filterwarnings("ignore", message=".*is not resumable.*")
    try:
        metrics = train(cfg)
    except NonFiniteStop as err:
        exit_with(err, EXIT_NONFINITE)
    except KeyboardInterrupt:  # before training started: nothing to save
        exit_with("interrupted (Ctrl-C) before training started", EXIT_SIGINT)
    except user_error_types() as err:
        exit_with(err, EXIT_USER_ERROR)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":  # `python -m elise.train`: the same command as the checkout's train.py
    from elise.cli import main as cli_main

    cli_main("train")
