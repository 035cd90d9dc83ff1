"""``python -m elise.demo`` and ``python -m elise.bench`` take key=value like every other command."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from testkit import save_tiny

from elise.bench.__main__ import PARTS, bench_args
from elise.cli import check_overrides, help_text
from elise.demo import demo_args
from elise.demo import main as demo_main


def test_demo_splits_out_from_training_overrides(tmp_path):
    run_dir, overrides = demo_args([f"out={tmp_path / 'run'}", "trainer.max_steps=3", "optim.lr=0.01"])
    assert run_dir == (tmp_path / "run").resolve()
    assert overrides == ["trainer.max_steps=3", "optim.lr=0.01"]


def test_demo_default_out_is_a_fresh_time_stamped_dir():
    run_dir, overrides = demo_args([])
    assert run_dir.parent.name == "demo_out" and overrides == []
    assert not run_dir.exists()


def test_demo_misspelled_training_key_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo_args([f"out={tmp_path}", "trainer.max_stesp=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unknown key 'trainer.max_stesp'; did you mean 'trainer.max_steps'?\n"


def test_demo_non_empty_out_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        demo_main([f"out={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"out={tmp_path.resolve()} is not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


def test_demo_help_names_out_and_points_to_train_keys(capsys):
    assert demo_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "out=null" in out and "python train.py --help" in out


def _bench_cfg(argv: list[str]):
    return check_overrides("bench", argv)


def test_bench_keys_and_defaults(tmp_path):
    assert bench_args(_bench_cfg([])) == (PARTS, False, 2, Path("outputs/bench/bench_results.json"))
    parts, quick, threads, out = bench_args(
        _bench_cfg(["part=synth", "quick=true", "threads=1", f"out={tmp_path / 'r.json'}"])
    )
    assert (parts, quick, threads, out) == (("synth",), True, 1, tmp_path / "r.json")


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"part": "synthh"},
            "error: part=synthh: no such part; choose one of: all, synth, train, data, gpu, serve, lora\n",
        ),
        ({"quick": "yes"}, "error: quick=yes: write quick=true or quick=false\n"),
        ({"threads": 0}, "error: threads=0: a whole number of CPU threads, 1 or more\n"),
        ({"threads": "two"}, "error: threads=two: a whole number of CPU threads, 1 or more\n"),
    ],
)
def test_bench_bad_value_is_one_line_exit_2(cfg, message, capsys):
    base = {"part": "all", "quick": False, "threads": 2, "out": "r.json"}
    with pytest.raises(SystemExit) as exc:
        bench_args(OmegaConf.create({**base, **cfg}))
    assert exc.value.code == 2 and capsys.readouterr().err == message


def test_bench_unknown_key_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench_cfg(["treads=4"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: unknown key 'treads'; did you mean 'threads'?\n"


def test_bench_help_lists_its_keys_from_the_yaml():
    text = help_text("bench", "python -m elise.bench")
    assert "part=all" in text and "all | synth | train | data | gpu" in text
    assert "quick=False" in text and "threads=2" in text and "torch CPU threads" in text


@pytest.mark.parametrize(
    ("codec", "note"),
    [("tiny", "tiny codec: a smoke test, not speech"),
     ("mimi_random", "Mimi with seeded random weights: noise, not speech"),
     (None, "codec unknown")],
)  # fmt: skip
def test_demo_says_what_codec_made_its_wav(tmp_path, codec, note):
    from elise.demo import codec_note

    assert codec_note(save_tiny(tmp_path / "m.ckpt", codec=codec)) == note


def test_bench_missing_judge_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    from elise.cli import main

    with pytest.raises(SystemExit) as exc:
        main("bench", ["part=synth", f"ckpt={tmp_path / 'none.ckpt'}", f"out={tmp_path / 'r.json'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.ckpt: no such checkpoint" in err
    assert not (tmp_path / "r.json").exists()  # nothing was measured


def test_bench_judges_agreement_on_a_given_checkpoint(tmp_path):
    from elise.bench.synth import judge_model

    model, probe, name = judge_model(str(save_tiny(tmp_path / "m.ckpt")))
    assert probe is None and name == f"checkpoint {tmp_path / 'm.ckpt'}"  # the default probe
    assert not model.training and "qkv" in model.decoder.layers[0].self_attn.fast  # eval, fused
