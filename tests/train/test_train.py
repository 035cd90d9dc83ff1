"""Training in-process on the bundled clips (tiny model, codec=tiny, CPU): losses, metrics,
checkpoints, exact resume, SIGTERM, init_from/freeze, bf16 master weights, one-line errors."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from testkit import sigterm_at

from elise.config import compose
from elise.report import main as report_main
from elise.report import write_report
from elise.train import main as train_main
from elise.train import train

STEPS = 6  # resume from step 3 must reproduce steps 4..6


def run(tmp: Path, overrides: list[str], extra: list[str], callbacks=None) -> dict[str, float]:
    cfg = compose("train", [*overrides, f"hydra.run.dir={tmp}", *extra], return_hydra_config=True)
    return train(cfg, callbacks=callbacks)


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, str]:
    """step -> the logged value, as written (exact comparison)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r[key] for r in csv.DictReader(f) if r.get(key)}


# A 6-step run with a checkpoint at step 3 (mid-epoch: 14 clips in batches of <= 4 samples).
BASE = [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=3",
    "callbacks.checkpoint.every_n_train_steps=3",
    "callbacks.checkpoint.save_last=true",
    "optim.warmup_steps=2",
    "+callbacks.batch_log._target_=elise.callbacks.BatchLog",
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, fast_overrides) -> tuple[Path, dict[str, float]]:
    run_dir = tmp_path_factory.mktemp("base")
    return run_dir, run(run_dir, fast_overrides, BASE)


def test_run_writes_metrics_checkpoints_and_samples(base_run):
    run_dir, metrics = base_run
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0])
    for split in ("train", "val"):
        assert {f"{split}/acc_cb{k}" for k in range(32)} <= header
        assert {f"{split}/loss_cb{k}" for k in range(32)} <= header
    assert {
        "step",
        "train/loss",
        "train/backbone_loss",
        "train/decoder_loss",
        "train/lr",
        "train/tokens_seen",
    } <= header
    assert sorted(losses(run_dir)) == list(range(STEPS))  # train/loss at every logged step
    val = [r for r in rows if r.get("val/loss")]
    assert len(val) == 2 and all(0.0 <= float(r["val/acc_cb7"]) <= 1.0 for r in val)
    first = float(losses(run_dir)[0])
    assert first == pytest.approx(2 * 7.626, abs=0.01)  # zero heads: ln(2051) for backbone + decoder
    ckpts = {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert {"step0000003.ckpt", "step0000006.ckpt", "last.ckpt"} <= ckpts
    assert len(list((run_dir / "samples").glob("step*_*.wav"))) == 4  # 2 sentences x 2 validations
    assert "max_steps: 6" in (run_dir / "config.yaml").read_text()  # the composed config, recorded
    assert metrics["val/loss"] < first and "train/acc_cb31" in metrics


def test_checkpoint_is_plain_data_and_loads_for_synthesis(base_run):
    from elise.checkpoints import load_model
    from elise.module import EliseModule

    path = base_run[0] / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert (
        hp["model"]["backbone"]["dim"] == 32
        and hp["tokenizer"] == "bytes"
        and hp["loss"]["decoder_fraction"] == 0.25
    )
    assert ckpt["global_step"] == STEPS and "EliseDataModule" in ckpt
    loaded = load_model(path)
    assert loaded.source == "elise" and loaded.model.cfg.decoder.dim == 16
    # the codec it was trained on is recorded (issue 10.2): synthesis and export default to it
    assert (
        loaded.codec is not None and loaded.codec["name"] == "tiny" and loaded.codec["weights_sha256"] is None
    )
    assert "seed" in loaded.codec["config"] and "device" not in loaded.codec["config"]
    module = EliseModule.load_from_checkpoint(path, map_location="cpu")
    assert torch.equal(module.model.audio_head, loaded.model.audio_head)


def test_resume_from_step_n_reproduces_steps_n_plus_1_to_2n(base_run, fast_overrides, tmp_path):
    base_dir = base_run[0]
    run(tmp_path, fast_overrides, [*BASE, f"ckpt_path={base_dir / 'checkpoints' / 'step0000003.ckpt'}"])
    resumed, reference = losses(tmp_path), losses(base_dir)
    assert sorted(resumed) == [3, 4, 5]
    assert resumed == {s: reference[s] for s in (3, 4, 5)}
    # the same clips in the same order, and the same decoder frames (same losses per codebook)
    assert (tmp_path / "batches_rank0.txt").read_text().splitlines() == (
        (base_dir / "batches_rank0.txt").read_text().splitlines()[3:]
    )
    assert losses(tmp_path, "train/loss_cb17") == {
        s: losses(base_dir, "train/loss_cb17")[s] for s in (3, 4, 5)
    }


def test_same_seed_same_losses_and_sigterm_saves_a_resumable_checkpoint(base_run, fast_overrides, tmp_path):
    base_dir = base_run[0]
    first = tmp_path / "first"
    with pytest.raises(SystemExit) as exit_info:
        run(first, fast_overrides, BASE, callbacks=[sigterm_at(2)])
    assert exit_info.value.code == 143
    saved = first / "checkpoints" / "sigterm-step0000002.ckpt"
    assert saved.is_file()
    reference = losses(base_dir)
    assert losses(first) == {s: reference[s] for s in (0, 1)}  # same seed -> identical losses
    # ckpt_path=last picks the SIGTERM checkpoint (the newest) and finishes the run exactly
    run(first, fast_overrides, [*BASE, "ckpt_path=last"])
    assert losses(first) == reference


def test_init_from_loads_weights_freezes_backbone_and_restarts_the_schedule(
    base_run, fast_overrides, tmp_path
):
    from elise.checkpoints import load_model

    source = base_run[0] / "checkpoints" / "last.ckpt"
    start = load_model(source).model.state_dict()
    seen = {}

    class Inspect(pl.Callback):
        def on_train_start(self, trainer, module):
            opt = trainer.optimizers[0]
            seen["n_opt"] = sum(p.numel() for g in opt.param_groups for p in g["params"])
            seen["backbone_trainable"] = any(p.requires_grad for p in module.model.backbone.parameters())
            seen["start_equal"] = torch.equal(module.model.audio_head, start["audio_head"])

        def on_train_end(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["state"] = {k: v.clone() for k, v in module.model.state_dict().items()}

    extra = [
        "trainer.max_steps=2",
        f"init_from={source}",
        "freeze_backbone=true",
        "trainer.val_check_interval=100",
    ]
    run(tmp_path, fast_overrides, extra, callbacks=[Inspect()])
    assert seen["start_equal"] and not seen["backbone_trainable"] and seen["step"] == 2
    n_frozen = sum(v.numel() for k, v in start.items() if k.startswith(("backbone.", "text_embeddings.")))
    assert seen["n_opt"] == sum(v.numel() for v in start.values()) - n_frozen
    after = seen["state"]
    assert all(
        torch.equal(after[k], start[k]) for k in start if k.startswith(("backbone.", "text_embeddings."))
    )
    assert not torch.equal(after["audio_head"], start["audio_head"])
    assert float(losses(tmp_path)[0]) < 2 * 7.6  # starts from the trained weights, not from scratch


def test_bf16_mixed_keeps_fp32_master_weights(fast_overrides, tmp_path, caplog):
    seen = {}

    class Dtypes(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen["params"] = {p.dtype for p in module.parameters()}
            seen["grads"] = {p.grad.dtype for p in module.parameters() if p.grad is not None}

    extra = [
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=1",
        "data.max_samples=2",
        "callbacks.checkpoint=null",
    ]
    metrics = run(tmp_path, fast_overrides, extra, callbacks=[Dtypes()])
    assert seen["params"] == {torch.float32} and seen["grads"] == {torch.float32}
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "trainer.precision=auto measures it" in caplog.text  # the one-line warning for bf16 on a CPU


def test_overfitting_a_few_clips_drives_the_loss_down(fast_overrides, tmp_path):
    extra = [
        "trainer.max_steps=40",
        "data.max_items=6",
        "data.val_count=2",
        "data.max_samples=4",
        "optim.lr=1e-2",
        "optim.warmup_steps=3",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint=null",
    ]
    run(tmp_path, fast_overrides, extra)
    values = [float(v) for v in losses(tmp_path).values()]
    assert values[0] == pytest.approx(15.25, abs=0.02)
    assert sum(values[-3:]) / 3 < 0.4 * values[0], values  # measured: 15.25 -> 4.9 in 40 steps


def test_report_png(base_run, tmp_path):
    out = write_report(base_run[0])
    assert out.name == "report.png" and out.stat().st_size > 20_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exited:  # no metrics.csv: one-line error, not a traceback
        report_main(OmegaConf.create({"run_dir": str(tmp_path), "out": None}))
    assert exited.value.code == 2


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["require_init_from=true"], "init_from="),
        (["data=elise", "data.name=nobody/not-a-dataset"], "data.path="),
        (["trainer.precision=bf16-true"], "bf16-mixed"),  # 16-bit weights without an fp32 copy are refused
        (["precision=bf16-mixed"], "trainer.precision=bf16-mixed"),  # the moved key points to its new home
    ],
    ids=["missing_init_from", "unavailable_data", "16_bit_weights", "moved_precision_key"],
)
def test_user_errors_are_one_line_exit_2(fast_overrides, tmp_path, capsys, overrides, expected):
    cfg = compose(
        "train", [*fast_overrides, *overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True
    )
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and expected in err


def test_missing_resume_checkpoint_is_one_line_exit_2(fast_overrides, tmp_path, capsys):
    cfg = compose(
        "train", [*fast_overrides, "ckpt_path=last", f"hydra.run.dir={tmp_path}"], return_hydra_config=True
    )
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    assert exit_info.value.code == 2 and "ckpt_path=last" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["elise", "elise_finetune"])
def test_elise_experiments_run_with_tiny_overrides(experiment, base_run, code_cache, tmp_path):
    """The real recipes (their callbacks, schedule, loss settings) for 2 steps on the sample clips."""
    overrides = [
        f"experiment={experiment}",
        "model=tiny",
        "data=sample",
        "codec=tiny",
        "trainer.precision=32-true",
        "logger=csv",
        "threads=1",
        f"paths.cache_dir={code_cache}",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",  # alone: the configured bar is dropped (Lightning refused it)
    ]
    if experiment == "elise_finetune":
        overrides += [f"init_from={base_run[0] / 'checkpoints' / 'last.ckpt'}", "freeze_backbone=true"]
    run(tmp_path, overrides, [])
    assert sorted(losses(tmp_path)) == [0, 1]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert ckpt["global_step"] == 2  # last.ckpt is the final state even with checkpoints every 10k steps
    if experiment == "elise":
        assert hp["optim"]["lr"] == 1e-4 and hp["loss"]["decoder_fraction"] == 0.0625
        assert hp["model"]["backbone"]["dim"] == 128  # model=tiny won over the recipe's marvis_250m
    else:
        assert hp["loss"]["decoder_fraction"] == 1.0 and hp["freeze_backbone"] is True
        assert hp["model"]["backbone"]["dim"] == 32  # init_from's architecture, not model=tiny


def test_speaker_names_of_the_data_reach_the_checkpoint_and_synthesis(fast_overrides, tmp_path):
    """LJSpeech with a speaker column -> train -> the checkpoint's map -> ``speaker=<name>`` resolves."""
    from testkit import lj_folder

    from elise.checkpoints import load_model
    from elise.synthesis.engine import resolve_speaker

    root = lj_folder(tmp_path / "lj", 6)
    names = ["alice", "bob", "alice", "bob", "carol", "alice"]
    (root / "metadata.csv").write_text(
        "".join(f"c{i:02d}|{name}|Clip number {i}.\n" for i, name in enumerate(names)), encoding="utf-8"
    )
    data = ["data=ljspeech", f"data.root={root}", "data.val_count=1", "callbacks.audio_samples=null"]
    run(tmp_path / "run", [*fast_overrides, *data], ["trainer.max_steps=1", "trainer.val_check_interval=1"])
    loaded = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert sorted(loaded.speakers) == ["alice", "bob", "carol"]
    assert len(set(loaded.speakers.values())) == 3
    assert resolve_speaker("bob", loaded.speakers) == loaded.speakers["bob"]
    with pytest.raises(Exception, match="dave"):
        resolve_speaker("dave", loaded.speakers)
