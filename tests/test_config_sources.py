"""Configs are the single source: each setting has one home, and what the yaml says reaches the code."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from hydra.utils import instantiate

from elise.callbacks import SaveOnSigterm
from elise.config import CONF_DIR, compose, conf_defaults, trainer_precision
from elise.model import PRESETS, preset
from elise.module import EliseModule
from elise.optim import optim_settings
from elise.train import UserError, build_callbacks, check_config

SHARED_DATA_KEYS = {
    "split", "cache_dir", "min_seconds", "max_seconds", "silence_threshold", "val_fraction", "val_count",
    "split_seed", "strict", "max_items", "max_samples", "max_tokens", "num_workers",
}  # fmt: skip


def trainer_of(overrides: list[str]) -> pl.Trainer:
    cfg = compose("train", ["experiment=demo", "trainer.accelerator=cpu", *overrides])
    check_config(cfg)
    return instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)


@pytest.mark.parametrize(
    "spelling,expected",
    [("32", "32-true"), ("32-true", "32-true"), ("bf16", "bf16-mixed"), ("bf16-mixed", "bf16-mixed")],
)
def test_every_precision_spelling_reaches_the_trainer(spelling, expected):
    assert trainer_of([f"trainer.precision={spelling}"]).precision == expected


def test_16_mixed_spellings_normalize():
    # (a 16-mixed Trainer needs a GPU to be built: the normalization is what elise owns)
    assert trainer_precision("16") == trainer_precision(16) == trainer_precision("16-mixed") == "16-mixed"
    assert trainer_precision(32) == trainer_precision(None) == "32-true"


def test_double_plus_trainer_precision_reaches_the_trainer_and_single_plus_is_not_silent():
    assert trainer_of(["++trainer.precision=bf16-mixed"]).precision == "bf16-mixed"
    with pytest.raises(Exception, match="trainer.precision"):  # Hydra: the key exists, use ++ or none
        compose("train", ["+trainer.precision=bf16-mixed"])


def test_typed_precision_is_the_trainer_precision():
    from elise.cli import aliased_args, check_overrides

    argv = aliased_args("train", ["trainer.devices=1", "precision=bf16-mixed"])  # the brief's command line
    assert argv == ["trainer.devices=1", "trainer.precision=bf16-mixed"]
    assert check_overrides("train", argv).trainer.precision == "bf16-mixed"
    assert aliased_args("synthesize", ["precision=x"]) == ["precision=x"]  # aliases are per command


def test_top_level_precision_in_a_composed_config_is_a_one_line_pointer():
    cfg = compose("train", ["experiment=demo", "precision=bf16-mixed"])
    with pytest.raises(UserError, match=r"trainer\.precision=bf16-mixed"):
        check_config(cfg)


def test_sixteen_bit_weights_are_refused():
    with pytest.raises(ValueError, match="bf16-mixed or 16-mixed"):
        trainer_precision("bf16-true")


def test_demo_experiment_selects_a_preset_and_model_override_wins():
    cfg = compose("train", ["experiment=demo", "model=csm_1b"])
    assert cfg.model.name == "csm_1b"
    assert preset("csm_1b").to_dict() == preset_of(cfg)
    assert compose("train", ["experiment=demo"]).model.backbone.dim == 64


def preset_of(cfg) -> dict:
    from elise.model.config import CSMConfig

    return CSMConfig.from_dict(dict(cfg.model)).to_dict()


@pytest.mark.parametrize("name", ["tiny", "demo", "test", "marvis_250m", "csm_1b"])
def test_presets_are_the_yaml_files(name):
    assert name in PRESETS
    assert preset(name).to_dict() == preset_of(compose("train", [f"model={name}"]))


def test_presets_py_writes_no_sizes():
    source = (Path(__file__).parent.parent / "elise" / "model" / "presets.py").read_text()
    assert "TransformerConfig(" not in source and "1536" not in source


def test_sigterm_null_means_no_sigterm_callback(tmp_path):
    here = f"paths.output_dir={tmp_path}"
    cfg = compose("train", ["experiment=demo", "callbacks.sigterm=null", here])
    assert not any(isinstance(cb, SaveOnSigterm) for cb in build_callbacks(cfg, tmp_path))
    cfg = compose("train", ["experiment=demo", here])
    sigterm = [cb for cb in build_callbacks(cfg, tmp_path) if isinstance(cb, SaveOnSigterm)]
    assert len(sigterm) == 1 and sigterm[0].dirpath == str(tmp_path / "checkpoints")  # ${paths.output_dir}


@pytest.mark.parametrize("source", ["elise", "ljspeech", "manifest", "sample"])
def test_data_sources_inherit_the_shared_keys(source):
    text = yaml.safe_load((CONF_DIR / "data" / f"{source}.yaml").read_text())
    assert text["defaults"] == ["default", "_self_"]
    assert not (SHARED_DATA_KEYS - {"val_count"}) & set(text)  # only what differs is written
    cfg = compose("train", [f"data={source}"])
    default = compose("train", ["data=sample"]).data
    assert set(cfg.data) >= SHARED_DATA_KEYS
    assert cfg.data.source == source and cfg.data.max_tokens == default.max_tokens


def test_default_data_file_holds_the_shared_keys():
    assert set(yaml.safe_load((CONF_DIR / "data" / "default.yaml").read_text())) >= SHARED_DATA_KEYS


def test_code_defaults_are_the_yaml_defaults():
    adamw = yaml.safe_load((CONF_DIR / "optim" / "adamw.yaml").read_text())
    settings = optim_settings(None)
    assert settings["lr"] == adamw["lr"] and settings["max_bad_steps"] == adamw["max_bad_steps"]
    module = EliseModule(preset("test").to_dict())
    assert module.loss_cfg == conf_defaults("loss/default")
    assert module.max_bad_steps == adamw["max_bad_steps"]


def test_codec_defaults_come_from_its_yaml():
    from elise.codec import build_codec

    codec = build_codec("tiny")
    assert codec.num_codebooks == conf_defaults("codec/tiny")["num_codebooks"]


def test_loss_group_reaches_the_module():
    cfg = compose("train", ["experiment=demo", "loss.decoder_weight=0.5"])
    assert cfg.loss.decoder_weight == 0.5
    module = EliseModule(preset("test").to_dict(), loss=dict(cfg.loss))
    assert module.loss_cfg["decoder_weight"] == 0.5 and module.loss_cfg["decoder_fraction"] == 0.25


def test_demo_logs_at_least_once_per_epoch():
    """Lightning warns when log_every_n_steps exceeds the batches of an epoch (14 clips, 2 val)."""
    cfg = compose("train", ["experiment=demo"])
    batches = -(-(16 - cfg.data.val_count) // cfg.data.max_samples)
    assert cfg.trainer.log_every_n_steps <= batches


GROUPS = (
    "model",
    "data",
    "codec",
    "trainer",
    "loss",
    "optim",
    "logger",
    "callbacks",
    "paths",
    "experiment",
    "debug",
)


def uncommented_keys(path: Path) -> list[str]:
    """Keys of a yaml file without a ``# comment`` line right above them (``_target_``, ``defaults``
    and the group names of ``_global_`` files excepted): ``--help`` is built from those comments."""
    missing, previous = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        key = stripped.split(":", 1)[0]
        is_key = ":" in stripped and not stripped.startswith(("#", "-")) and " " not in key
        group_of_global = line == stripped and key in GROUPS  # `trainer:` in an experiment file
        if (
            is_key
            and not group_of_global
            and key not in ("_target_", "defaults")
            and not previous.startswith("#")
        ):
            missing.append(f"{path.parent.name}/{path.name}: {key}")
        if stripped:
            previous = stripped
    return missing


def test_every_group_key_has_a_comment():
    missing = [m for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml")) for m in uncommented_keys(p)]
    assert not missing, missing
