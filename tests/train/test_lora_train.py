"""LoRA fine-tuning end to end on a new voice made at test time (test-size model, codec=tiny, CPU):
the loss goes down, the base stays bit-identical, the checkpoint holds the adapters + a hashed
reference to its base, loads merged, resumes after SIGTERM, and refuses a different base."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from testkit import sigterm_at

from elise.checkpoints import CheckpointError, load_model, read_checkpoint, weights_sha256
from elise.config import compose
from elise.model.lora import is_lora_key
from elise.train import train

STEPS = 8
LORA = [
    "lora=default",
    "lora.rank=4",
    "lora.dropout=0.0",
    "optim.lr=3e-2",
    "optim.warmup_steps=2",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=100",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.checkpoint.save_last=true",
    "callbacks.best=null",
    "callbacks.audio_samples=null",
]


def run(run_dir: Path, overrides: list[str], callbacks=None) -> dict[str, float]:
    cfg = compose("train", [*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    return train(cfg, callbacks=callbacks)


def losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


class Final(pl.Callback):
    """The CSM's weights at the end of training."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer, module) -> None:
        self.state = {k: v.clone() for k, v in module.model.state_dict().items()}


def write_base(path: Path, fast_overrides: list[str]) -> Path:
    """A random test-size model with random heads (zero heads would make every logit 0, whatever the
    adapters do), saved as an elise checkpoint of the fast config's codec."""
    from elise.codec import codec_identity
    from elise.module import EliseModule

    cfg = compose("train", fast_overrides)
    torch.manual_seed(0)
    model, codec = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "codec"))
    module = EliseModule(model=model, codec=codec_identity(str(cfg.codec.name), codec))
    with torch.no_grad():
        module.model.codebook0_head.weight.normal_(std=0.3)
        module.model.audio_head.normal_(std=0.3)
    hp = dict(module.hparams)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp, "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def voice_run(tmp_path_factory, fast_overrides):
    """LoRA from a random base on a 'new voice' (an LJSpeech folder of tones)."""
    from testkit import lj_folder

    tmp = tmp_path_factory.mktemp("lora")
    base = write_base(tmp / "base.ckpt", fast_overrides)
    voice = lj_folder(tmp / "voice", 6, seconds=0.8)
    data = ["data=ljspeech", f"data.root={voice}", "data.val_count=1", f"init_from={base}"]
    overrides = [*fast_overrides, *data, *LORA]
    final = Final()
    run(tmp / "run", overrides, [final])
    return tmp, base, overrides, final.state


def test_lora_lowers_the_loss_on_the_new_voice_and_leaves_the_base_bit_identical(voice_run):
    tmp, base, _, final = voice_run
    values = [float(v) for v in losses(tmp / "run").values()]
    assert len(values) == STEPS
    # measured: 17.64, 17.83, 17.32, ... 16.02, 15.54, 12.60 (mean of the first 3: 17.6, last 3: 14.7)
    assert sum(values[-3:]) / 3 < 0.9 * sum(values[:3]) / 3 and values[-1] < 0.8 * values[0], values
    start = load_model(base).model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in start.items())  # every base tensor, bit for bit
    assert any(is_lora_key(k) and v.abs().sum() > 0 for k, v in final.items())  # B moved off zero


def test_checkpoint_holds_adapters_config_and_base_hash_and_loads_merged(voice_run):
    tmp, base, _, final = voice_run
    path = tmp / "run" / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(path)
    assert ckpt["state_dict"] and all(is_lora_key(k) for k in ckpt["state_dict"])
    hp = ckpt["hyper_parameters"]
    assert hp["lora"] == {
        "rank": 4,
        "alpha": 32.0,
        "dropout": 0.0,
        "targets": ["backbone.attn", "backbone.mlp", "decoder.attn", "decoder.mlp"],
    }
    assert hp["lora_base"] == {
        "path": str(base.resolve()),
        "sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
    }
    assert path.stat().st_size < 0.5 * base.stat().st_size  # adapters + their Adam state only
    loaded = load_model(path)
    assert loaded.meta["lora"]["sha256"] == hp["lora_base"]["sha256"]
    merged = loaded.model.state_dict()
    assert not any(is_lora_key(k) for k in merged)
    scale = 32.0 / 4
    for key, w in merged.items():
        if key.endswith("proj.weight"):  # W + (alpha / r) B A, from the trained adapters
            stem = key[: -len("weight")]
            expected = final[key] + scale * final[stem + "lora_B"] @ final[stem + "lora_A"]
            torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(w, final[key])


def test_a_different_or_missing_base_is_a_one_line_error(voice_run, tmp_path):
    tmp, base, _, _ = voice_run
    path = tmp / "run" / "checkpoints" / "last.ckpt"
    other = tmp_path / "other.ckpt"
    shutil.copy(base, other)
    with open(other, "ab") as f:  # same weights, different bytes: a different file
        f.write(b"\0")
    with pytest.raises(CheckpointError) as err:
        load_model(path, base=other)
    assert "\n" not in str(err.value) and "sha256" in str(err.value) and "pass base=" in str(err.value)
    with pytest.raises(CheckpointError, match=r"is not found: pass base=") as err:
        load_model(path, base=tmp_path / "gone.ckpt")
    assert "\n" not in str(err.value)
    shutil.copy(base, tmp_path / "copy.ckpt")  # the same bytes elsewhere: found by base=
    assert load_model(path, base=tmp_path / "copy.ckpt").meta["lora"]["base"] == str(tmp_path / "copy.ckpt")


def test_sigterm_saves_adapters_and_resuming_reproduces_the_run(voice_run):
    tmp, _, overrides, _ = voice_run
    run_dir = tmp / "sigterm"
    with pytest.raises(SystemExit) as exit_info:
        run(run_dir, overrides, [sigterm_at(3)])
    assert exit_info.value.code == 143
    saved = read_checkpoint(run_dir / "checkpoints" / "sigterm-step0000003.ckpt")
    assert all(is_lora_key(k) for k in saved["state_dict"]) and saved["optimizer_states"]
    run(run_dir, [*overrides, "ckpt_path=last"])
    assert losses(run_dir) == losses(tmp / "run")  # steps 0..7, bit for bit


def test_nonfinite_steps_are_skipped_with_adapters(voice_run, monkeypatch):
    """The guard sees the adapters' gradients: a NaN step changes no adapter."""
    import dataclasses

    from elise.module import EliseModule

    tmp, _, overrides, _ = voice_run
    real = EliseModule._loss

    def loss(self, batch, fraction, generator):
        out = real(self, batch, fraction, generator)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if self.global_step == 2 else out

    monkeypatch.setattr(EliseModule, "_loss", loss)
    seen = {}

    class Adapters(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            seen[trainer.global_step] = {
                k: v.clone() for k, v in module.model.state_dict().items() if is_lora_key(k)
            }

    metrics = run(tmp / "nan", [*overrides, "trainer.max_steps=4"], [Adapters()])
    assert metrics["train/skipped_steps"] == 1
    assert all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])
    assert not all(torch.equal(seen[4][k], seen[3][k]) for k in seen[3])


def test_voice_experiment_composes_lora_on_a_required_base():
    cfg = compose("train", ["experiment=voice"])
    assert cfg.require_init_from and cfg.init_from is None and cfg.model.name == "marvis_250m"
    assert cfg.lora.rank == 16 and list(cfg.lora.targets) == [
        "backbone.attn",
        "backbone.mlp",
        "decoder.attn",
        "decoder.mlp",
    ]
    assert cfg.loss.decoder_fraction == 1.0
    assert compose("train", []).get("lora") is None  # off unless asked for


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["lora=default"], "lora adapts existing weights: pass init_from="),
        (["lora=default", "init_from=x.ckpt", "lora.targets=[encoder.attn]"], "not <stack>.<part>"),
    ],
)
def test_lora_user_errors_are_one_line_exit_2(fast_overrides, tmp_path, capsys, extra, expected):
    from elise.train import main as train_main

    cfg = compose("train", [*fast_overrides, *extra, f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and expected in err and "\n" not in err


def test_lora_ckpt_synthesizes_and_its_export_gives_transformers_the_same_greedy_codes(voice_run, tmp_path):
    """synthesize.py ckpt=<LoRA ckpt> (base from the record; fused + int8 after merging) runs, and
    ``elise.export`` of it is a plain directory on which transformers' greedy generate gives elise's codes."""
    import numpy as np

    transformers = pytest.importorskip("transformers")
    from elise.export import export_checkpoint
    from elise.generate import SamplingConfig, generate
    from elise.layout import segment_rows
    from elise.synthesize import run as synthesize

    tmp, base, _, _ = voice_run
    lora = tmp / "run" / "checkpoints" / "last.ckpt"
    cfg = compose("synthesize", [])
    settings = {
        "ckpt": str(lora), "text": "Hello there.", "seed": 0, "device": "cpu", "quantize": "int8",
        "max_audio_seconds": 0.64, "save_codes": True, "output": str(tmp_path / "lora.wav"),
    }  # fmt: skip
    for key, value in settings.items():
        cfg[key] = value
    synthesize(cfg)
    assert np.load(tmp_path / "lora.codes.npy").shape[0] == 32

    files = export_checkpoint(lora, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "elise.json").read_text())
    assert record["lora_merged_into"]["sha256"] == weights_sha256(base)
    assert sum(f.stat().st_size for f in files) > lora.stat().st_size  # a full, plain model
    hf, info = transformers.CsmForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not [k for k in info["missing_keys"] if not k.startswith("codec_model.")]
    loaded = load_model(lora)
    text_ids = loaded.tokenizer.encode("[0]Hello there.")
    tokens, mask = segment_rows(text_ids, None, eos=False)
    spare = [2048, 2049, 2050]
    with torch.no_grad():
        ours, _ = generate(
            loaded.model, tokens[None], mask[None], 6, SamplingConfig(1.0, 1), stop_on_eos=False
        )
        before, _ = generate(
            load_model(base).model, tokens[None], mask[None], 6, SamplingConfig(1.0, 1), stop_on_eos=False
        )
        theirs = hf.eval().generate(
            input_ids=torch.tensor([text_ids]), max_new_tokens=6, do_sample=False,
            depth_decoder_do_sample=False, suppress_tokens=spare, depth_decoder_suppress_tokens=spare,
        )[0].t()  # fmt: skip
    frames = theirs.shape[1]  # transformers stops at an all-zero codebook-0 frame
    assert frames >= 2 and torch.equal(theirs, ours[0, :, :frames])
    assert not torch.equal(before, ours)  # the adapters matter


def test_voice_eval_scores_the_base_and_the_result_on_held_out_clips(
    voice_run, tmp_path, capsys, monkeypatch
):
    """experiment=voice's before/after: elise.evaluate on the held-out clip with the base at the start
    and the trained model at the end, both the module's in memory (no checkpoint read again); the
    summary prints both."""
    import elise.synthesis.runtime as runtime

    _, _, overrides, _ = voice_run
    read = []
    monkeypatch.setattr(runtime, "load", lambda *args: read.append(args) or pytest.fail("read from disk"))
    extra = [
        "trainer.max_steps=2",
        "+voice_eval.clips=1",
        "+voice_eval.metrics=[wer,sim]",
        "+voice_eval.asr=pocketsphinx",
    ]
    run(tmp_path, [*overrides, *extra])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("voice eval on 1 held-out clips"))
    assert "wer " in line and "sim " in line and " -> " in line and "nan" not in line
    for name, step in (("before", 0), ("after", 2)):
        report = json.loads((tmp_path / "voice_eval" / name / "eval_report.json").read_text())
        assert report["summary"]["counts"]["items"] == 1
        assert report["run"]["ckpt"].endswith(f"(in memory, step {step})")
    assert not read
    assert len(list((tmp_path / "voice_eval" / "held_out").glob("*.wav"))) == 1


SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "My voice, recorded today, for a small test.",
    "Reading one sentence at a time is enough.",
    "This folder has no transcripts but its sidecars.",
    "Pauses between words are kept as they are.",
    "The last take of the afternoon session.",
)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_readme_voice_command_runs_offline_on_recordings_made_at_test_time(voice_run, code_cache, tmp_path):
    """``python train.py experiment=voice init_from=<base> data=folder data.root=my_voice/`` at the test
    size (codec tiny, CPU, 3 steps): espeak-ng recordings with sidecar transcripts in, adapters out."""
    import subprocess

    _, base, _, _ = voice_run
    root = tmp_path / "my_voice"
    root.mkdir()
    for i, sentence in enumerate(SENTENCES):
        subprocess.run(
            ["espeak-ng", "-w", str(root / f"take{i}.wav"), sentence], check=True, capture_output=True
        )
        (root / f"take{i}.txt").write_text(sentence + "\n", encoding="utf-8")
    command = ["experiment=voice", f"init_from={base}", "data=folder", f"data.root={root}"]
    test_size = [
        "codec=tiny", "trainer=cpu", "trainer.precision=32-true", "logger=csv", "threads=1",
        f"paths.cache_dir={code_cache}", "callbacks.eval=null", "callbacks.audio_samples=null",
        "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "voice_eval=null",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
        "data.val_count=1", "data.max_samples=2", "optim.warmup_steps=1", "lora.rank=4",
    ]  # fmt: skip
    metrics = run(tmp_path / "run", [*command, *test_size])
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    manifest = (tmp_path / "my_voice_clips" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["text"] for line in manifest) == sorted(SENTENCES)  # the sidecars' texts
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["lora"]["rank"] == 4
    assert all(is_lora_key(k) for k in ckpt["state_dict"])


def test_resuming_on_a_different_base_is_refused(voice_run, tmp_path):
    tmp, base, overrides, _ = voice_run
    other = tmp_path / "other.ckpt"
    shutil.copy(base, other)
    with open(other, "ab") as f:  # different bytes: a different base as far as the record goes
        f.write(b"\0")
    resumed = [o for o in overrides if not o.startswith("init_from=")]
    ckpt = tmp / "run" / "checkpoints" / "step0000004.ckpt"
    with pytest.raises(CheckpointError, match="adapters were trained on base") as err:
        run(tmp_path / "run", [*resumed, f"init_from={other}", f"ckpt_path={ckpt}"])
    assert "\n" not in str(err.value)


def test_resuming_loads_the_adapters_strictly_and_the_frozen_base_from_init_from(voice_run):
    """Lightning's order (``on_load_checkpoint``, then ``load_state_dict(strict=strict_loading)``): an
    adapter checkpoint lacks the frozen base only; a missing adapter or a stray key is an error."""
    from elise.module import EliseModule

    tmp, _, _, final = voice_run
    ckpt = read_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt")
    hp = ckpt["hyper_parameters"]

    def resume(state: dict) -> EliseModule:
        module = EliseModule(**hp)
        module.load_weights(load_model(hp["lora_base"]["path"]).model.state_dict())
        checkpoint = {**ckpt, "state_dict": state}
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
        return module

    module = resume(dict(ckpt["state_dict"]))
    assert all(torch.equal(v, final[k]) for k, v in module.model.state_dict().items())
    dropped = dict(ckpt["state_dict"])
    gone = next(iter(dropped))
    del dropped[gone]
    with pytest.raises(RuntimeError, match=f"Missing key.*{gone}"):
        resume(dropped)
    with pytest.raises(RuntimeError, match="Unexpected key.*model.stray.lora_A"):
        resume({**ckpt["state_dict"], "model.stray.lora_A": torch.zeros(1)})


def test_adapters_under_fsdp_load_without_the_base_as_before(voice_run):
    """FSDP's strategy loads the weights (``strict=strict_loading``) and pops them before
    ``on_load_checkpoint``: adapter checkpoints stay non-strict there, and the hook copes."""
    from types import SimpleNamespace

    from elise.module import EliseModule

    tmp, _, _, _ = voice_run
    ckpt = read_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt")
    module = EliseModule(**ckpt["hyper_parameters"])
    assert module.strict_loading  # single device, DDP: strict
    module._trainer = SimpleNamespace(strategy=type("FSDPStrategy", (), {})())
    assert not module.strict_loading
    without = {k: v for k, v in ckpt.items() if k not in ("state_dict", "elise_rng")}
    module.on_load_checkpoint(without)  # the state dict was popped already
    assert "state_dict" not in without
    module.lora = None
    assert module.strict_loading  # a full model loads strictly under FSDP too


def test_a_lora_checkpoint_missing_an_adapter_does_not_load(voice_run, tmp_path):
    tmp, _, _, _ = voice_run
    ckpt = read_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt")
    gone = sorted(ckpt["state_dict"])[-1]
    del ckpt["state_dict"][gone]
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="adapters do not match lora=") as err:
        load_model(tmp_path / "partial.ckpt")
    assert gone[len("model.") :] in str(err.value) and "\n" not in str(err.value)


def test_voice_eval_scores_the_base_from_disk_on_resume_and_skips_under_fsdp(tmp_path, monkeypatch, caplog):
    """Resumed, the module holds trained weights when training starts: 'before' is the base read from
    its path, not the module; under FSDP a forward on rank 0 alone would hang: skipped with a warning."""
    from types import SimpleNamespace

    import elise.evaluate.score as score
    from elise.train import VoiceEval

    monkeypatch.setattr(score, "Scorer", lambda *a, **kw: "scorer")
    example = SimpleNamespace(
        id="clip", text="Hello.", load_codes=lambda: torch.zeros(32, 4, dtype=torch.long)
    )
    data = SimpleNamespace(val_set=SimpleNamespace(examples=[example]))
    module = SimpleNamespace(device=torch.device("cpu"))

    def voice_eval() -> VoiceEval:
        ve = VoiceEval({"clips": 1}, "/runs/base.ckpt", {"name": "tiny"}, tmp_path, None)
        ve.evaluate = lambda loaded, name: ve.seen.append((loaded, name)) or {"wer": 0.5}  # type: ignore[method-assign]
        ve.seen = []  # type: ignore[attr-defined]
        return ve

    resumed = voice_eval()
    trainer = SimpleNamespace(is_global_zero=True, strategy=object(), global_step=6, datamodule=data)
    resumed.on_train_start(trainer, module)  # type: ignore[arg-type]
    assert resumed.seen == [("/runs/base.ckpt", "before")]  # type: ignore[attr-defined]

    class FSDPStrategy:
        pass

    sharded = voice_eval()
    trainer = SimpleNamespace(is_global_zero=True, strategy=FSDPStrategy(), global_step=0, datamodule=data)
    with caplog.at_level("WARNING"):
        sharded.on_train_start(trainer, module)  # type: ignore[arg-type]
    assert sharded.seen == [] and sharded.scorer is None and "skipped under FSDP" in caplog.text  # type: ignore[attr-defined]
