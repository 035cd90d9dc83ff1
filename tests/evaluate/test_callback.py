"""``callbacks=eval`` during training: eval/* figures in metrics.csv, the wavs in the run dir, the
report's eval row; on in experiment=elise, off in the demo."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from elise.config import compose
from elise.report import write_report
from elise.train import train


def test_eval_callback_logs_eval_metrics_and_keeps_the_wavs(
    fast_overrides: list[str], tmp_path: Path
) -> None:
    extra = [
        "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks=eval", "callbacks.audio_samples=null",
        "callbacks.eval.every_n_val=1", "callbacks.eval.num_sentences=2", "callbacks.eval.asr=pocketsphinx",
        "callbacks.eval.metrics=[wer,eos,duration_ratio]", "callbacks.eval.max_audio_seconds=0.3",
    ]  # fmt: skip
    cfg = compose("train", [*fast_overrides, *extra, f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    train(cfg)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/wer")]
    assert len(rows) == 1 and rows[0]["step"] == "2"
    assert float(rows[0]["eval/eos_rate"]) == 0.0  # 0.3 s is too short for any end-of-speech: all cut
    assert len(list((tmp_path / "eval" / "step0000002" / "wavs").glob("*.wav"))) == 2
    summary = json.loads((tmp_path / "eval" / "step0000002" / "eval_report.json").read_text())["summary"]
    for key in ("wer", "duration_ratio"):  # the logged figures are the report's
        assert float(rows[0][f"eval/{key}"]) == pytest.approx(summary[key]["mean"])
    assert write_report(tmp_path).stat().st_size > 0


def test_eval_callback_is_on_in_the_elise_recipe_and_off_in_the_demo() -> None:
    assert (
        compose("train", ["experiment=elise"]).callbacks.eval._target_
        == "elise.evaluate.callback.EvalCallback"
    )
    assert "eval" not in compose("train", ["experiment=demo"]).callbacks
