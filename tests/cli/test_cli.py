"""The one argument style of every command (elise.cli): any text or path reaches the command as typed,
a misspelled key is one line naming the closest key, ``--help`` lists the command's own keys."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import soundfile as sf
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from testkit import save_tiny

from elise.cli import COMMANDS, VERBATIM_KEYS, check_overrides, claim_run_dir, help_text, verbatim_args

ROOT = Path(__file__).resolve().parents[2]
AWKWARD = list("\\'\"${}[](),=:;# ~*?%@|`!\t") + ["${x}", "\\${", "é", "日本", "null", " "]
# any unicode text, and text built from the characters Hydra's and OmegaConf's grammars care about
typed = st.text() | st.lists(st.sampled_from(AWKWARD) | st.text(max_size=3), max_size=12).map("".join)
PARSER = OverridesParser.create()


def through_hydra(arg: str) -> object:
    """What Hydra's override parser then OmegaConf make of ``key=value`` (as compose does)."""
    [override] = PARSER.parse_overrides([arg])
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, override.key_or_group, override.value(), force_add=True)
    return OmegaConf.select(cfg, override.key_or_group)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(VERBATIM_KEYS)), value=typed)
def test_any_typed_value_arrives_verbatim(key, value):
    if value == "???" or (value == "null" and key not in ("text", "reference_text")):
        return  # OmegaConf's "missing" marker; a path key's null means "none"
    if key.startswith("reference_") and value.startswith("[") and value.endswith("]"):
        return  # a list of files / transcripts
    if key == "voices" and value.startswith("{"):
        return  # voices={name: {audio: ..., text: ...}}
    [arg] = verbatim_args([f"{key}={value}"])
    assert through_hydra(arg) == value


@pytest.mark.parametrize(
    "command,args",
    [
        ("synthesize", ['text="Hi," she said.', "reference_text='Tis the season.", "codec=tiny"]),
        ("synthesize", ["text=[laughs] okay", "reference_audio=my ref, take 2.wav", "codec=tiny"]),
        ("synthesize", ["text_file=my lines (v2).txt", "output=out/it's = $HOME \\ ${x}.wav", "codec=tiny"]),
        ("train", ["init_from=runs/a,b (old)/last.ckpt", "data.path=C:\\data\\x,y", "ckpt_path=it's"]),
        ("export", ["ckpt=a [1].ckpt", "out=dir, 'two'", "codec_config=c=d.json"]),
        ("report", ["run_dir=runs/2024 (1)", "out=r,1.png"]),
    ],
)
def test_issue_examples_compose_verbatim(command, args):
    cfg = check_overrides(COMMANDS[command][0], verbatim_args(args))
    for key, _, value in (arg.partition("=") for arg in args if not arg.startswith("codec=")):
        assert OmegaConf.select(cfg, key) == value, key


def test_lists_and_null_keep_their_meaning():
    cfg = check_overrides("synthesize", verbatim_args(["reference_audio=[a.wav,b.wav]", "ckpt=null"]))
    assert list(cfg.reference_audio) == ["a.wav", "b.wav"] and cfg.ckpt is None
    assert check_overrides("synthesize", verbatim_args(["text=null"])).text == "null"


@pytest.mark.parametrize(
    "command,arg,message",
    [
        ("synthesize", "tex=hi", "unknown key 'tex'; did you mean 'text'?"),
        ("train", "trainer.max_step=5", "unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?"),
        ("synthesize", "+temprature=0.1", "unknown key 'temprature'; did you mean 'temperature'?"),
        ("synthesize", "+temperature=0.1", "'temperature' is already a key"),
        ("train", "model=nope", "model=nope: no such model; choose one of: csm_1b, demo, marvis_250m"),
        ("model_info", "foo=1", "unknown key 'foo'"),
        ("train", "optim.lrr=1e-4,3e-4", "did you mean 'optim.lr'?"),  # a sweep is checked too
    ],
)
def test_wrong_keys_are_one_line(command, arg, message, capsys):
    with pytest.raises(SystemExit) as exited:
        check_overrides(COMMANDS[command][0], verbatim_args([arg]))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_plus_adds_lightning_keys():
    cfg = check_overrides("train", ["+trainer.gradient_clip_algorithm=value"])
    assert cfg.trainer.gradient_clip_algorithm == "value"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_own_keys_with_meanings(command):
    text = help_text(COMMANDS[command][0], COMMANDS[command][2])
    expected = {
        "train": ["ckpt_path=null", "resume exactly", "trainer.max_steps=", "model=<csm_1b |"],
        "synthesize": ["text=null", "one utterance", "codec=<mimi | mimi_random | tiny>"],
        "serve": ["max_batch=16", "continuous batching", "api_key=null"],
        "prepare": ["tokenizer=bytes", "data=<"],
        "export": ["ckpt=???", "output directory"],
        "report": ["run_dir=???", "metrics.csv"],
        "model_info": ["model.backbone.dim=128", "width"],
        "bench": ["part=all", "all | synth | train | data | gpu", "threads=2"],
        "evaluate": ["audio=null", "JSONL manifest", "asr=<auto | pocketsphinx | whisper>"],
    }[command]
    assert all(word in text for word in expected), text
    assert not [line for line in text.splitlines() if line.startswith(("  hydra.", "  paths."))]
    assert len(text.splitlines()) < 150  # not the resolved config dump


def test_model_info_help_and_unknown_key():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's elise
    ok = subprocess.run(
        [sys.executable, "-m", "elise.model", "--help"], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0 and "model=<" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "elise.model", "tex=1"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown key 'tex' (see --help for the keys)"


def test_synthesize_takes_typed_text_and_paths(tmp_path):
    """End to end: a text starting with a quote and an output path with a comma, parentheses, a quote;
    no codec= given: the checkpoint's recorded one (tiny) is used."""
    ckpt = save_tiny(tmp_path / "tiny.ckpt", codec="tiny")
    out = tmp_path / "take (2), it's.wav"
    args = [f"ckpt={ckpt}", 'text="Hi," she said.', f"output={out}", "max_audio_seconds=0.16", "seed=1"]
    cmd = [sys.executable, str(ROOT / "synthesize.py"), "device=cpu", *args]
    done = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}/h"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sf.info(out).frames > 0 and "Traceback" not in done.stderr


def test_two_runs_in_the_same_second_get_two_run_dirs(tmp_path, monkeypatch):
    command = "train"
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import hydra.core.utils

    class Frozen(datetime):  # the clock stands still: both runs resolve ${now:...} to one second
        @classmethod
        def now(cls, tz=None):
            return datetime(2024, 1, 1, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    first, second = (claim_run_dir(command, ["seed=1"])[-1] for _ in range(2))
    dirs = [Path(arg.split("=", 1)[1].strip("'")) for arg in (first, second)]
    assert dirs[0] != dirs[1] and dirs[1].name == dirs[0].name + "-2"
    assert all(d.is_dir() and not list(d.iterdir()) for d in dirs)
    named = claim_run_dir(command, [f"hydra.run.dir={tmp_path}/mine"])  # the user's own dir: kept
    assert named == [f"hydra.run.dir={tmp_path}/mine"]


def test_two_syntheses_in_the_same_second_get_two_output_dirs(tmp_path, monkeypatch):
    from elise.synthesis import inputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inputs.time, "strftime", lambda fmt: "2024-01-01_12-00-00")  # one second
    first, second = (inputs.output_paths(1, None, None)[0].parent for _ in range(2))
    assert first.name == "2024-01-01_12-00-00" and second.name == "2024-01-01_12-00-00-2"
    assert first.is_dir() and second.is_dir()
