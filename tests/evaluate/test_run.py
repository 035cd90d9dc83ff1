"""``python -m elise.evaluate``: audio mode on a manifest, compare, checkpoint mode, user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from evalkit import SAMPLE

from elise.cli import main
from elise.evaluate import evaluate_checkpoint

CHEAP = ["metrics=[eos,duration_ratio]", "progress=false"]


def manifest(tmp_path: Path, n: int = 3) -> Path:
    rows = [line.split("|", 1) for line in (SAMPLE / "metadata.csv").read_text().splitlines()[:n]]
    lines = [json.dumps({"audio": str(SAMPLE / "wavs" / f"{k}.flac"), "text": t,
                         "reference": str(SAMPLE / "wavs" / "sample_015.flac")}) for k, t in rows]  # fmt: skip
    lines += [
        '{"audio": "missing.wav", "text": "gone"}',
        "not json",
        json.dumps({"audio": str(SAMPLE / "wavs" / "sample_001.flac")}),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_audio_mode_scores_a_manifest_and_writes_the_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    main("evaluate", [f"audio={manifest(tmp_path)}", f"out={out}", "metrics=[wer,cer,eos,duration_ratio]",
                      "asr=pocketsphinx", "mos=none", "progress=false"])  # fmt: skip
    report = json.loads((out / "eval_report.json").read_text())
    assert len(report["items"]) == 3
    assert report["skipped"] == {"unreadable_audio": 1, "bad_metadata": 1, "no_text": 1}
    row = report["items"][0]
    assert {"text", "wav", "transcript", "wer", "cer", "eos", "duration_ratio", "flags", "reference"} <= set(
        row
    )
    assert (
        report["summary"]["wer"]["low"]
        <= report["summary"]["wer"]["mean"]
        <= report["summary"]["wer"]["high"]
    )
    assert (
        report["backends"]["asr"].startswith("pocketsphinx") and report["backends"]["asr_comparable"] is False
    )
    md = (out / "eval_report.md").read_text()
    assert "| WER | 0." in md and "## Worst 3 by WER" in md
    assert (out / "eval_report.png").stat().st_size > 1000
    assert "| WER |" in capsys.readouterr().out


def test_compare_says_no_difference_against_itself_and_finds_a_worse_run(tmp_path: Path, capsys) -> None:
    a = tmp_path / "a"
    main("evaluate", [f"audio={SAMPLE}", f"out={a}", "limit=6", *CHEAP])
    worse = json.loads((a / "eval_report.json").read_text())
    for row in worse["items"]:
        row["duration_ratio"] *= 2.0  # every utterance twice as long
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval_report.json").write_text(json.dumps(worse))
    capsys.readouterr()
    main("evaluate", [f"compare=[{a}/eval_report.json,{a}]"])
    same = capsys.readouterr().out
    assert (
        "6 utterances in both" in same
        and "no difference" in same
        and "better" not in same
        and "worse" not in same
    )
    main("evaluate", [f"compare=[{a},{tmp_path / 'b'}]"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| duration ratio"))
    assert "b higher" in line  # significant; a longer duration is neither better nor worse by itself


def test_checkpoint_mode_synthesizes_keeps_the_wavs_and_reports_stopping(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    report = evaluate_checkpoint(str(tiny_ckpt), ["Hello there.", "Good night."], tmp_path / "ev", codec="tiny",
                                 metrics=["eos", "duration_ratio", "rtf"], max_audio_seconds=0.4, progress=False)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ev" / "wavs").iterdir()) == ["0001.wav", "0002.wav"]
    rows = report["items"]
    assert [r["eos"] for r in rows] == [
        False,
        False,
    ]  # random heads never say end-of-speech: cut at the limit
    assert all("cut" in r["flags"] and r["rtf"] > 0 for r in rows)
    assert (
        report["summary"]["eos_rate"]["mean"] == 0.0 and report["run"]["settings"]["max_audio_seconds"] == 0.4
    )
    assert (tmp_path / "ev" / "eval_report.json").is_file()


def test_checkpoint_cli_with_two_voices_builds_the_voice_matrix(tiny_ckpt: Path, tmp_path: Path) -> None:
    a, b = SAMPLE / "wavs" / "sample_000.flac", SAMPLE / "wavs" / "sample_001.flac"
    texts = tmp_path / "set.txt"
    texts.write_text("One line.\n")
    out = tmp_path / "ev"
    main("evaluate", [f"ckpt={tiny_ckpt}", "codec=tiny", f"eval_set={texts}", f"out={out}", "metrics=[sim,eos]",
                      "sim=resemblyzer", "max_audio_seconds=0.4", f"reference_audio=[{a},{b}]",
                      "reference_text=[Hello there.,The weather.]", "progress=false"])  # fmt: skip
    report = json.loads((out / "eval_report.json").read_text())
    assert sorted(p.name for p in (out / "wavs").iterdir()) == ["v0_0001.wav", "v1_0001.wav"]
    assert [r["voice"] for r in report["items"]] == [0, 1]
    assert len(report["voice_match"]["matrix"]) == 2 and 0.0 <= report["voice_match"]["matched_share"] <= 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of ckpt="),
        (["audio=x", "compare=[a,b]"], "got audio, compare"),
        (["audio=/no/such/folder"], "no such folder or manifest"),
        (["compare=[a]"], "compare needs two reports"),
        (["audio=elise/assets/sample", "asr=kaldi"], "no such asr"),
        (["audio=elise/assets/sample", "metrics=[bleu]"], "unknown ['bleu']"),
    ],
)
def test_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main("evaluate", [*args, f"out={tmp_path / 'o'}", "progress=false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_existing_report_is_not_overwritten(tmp_path: Path, capsys) -> None:
    (tmp_path / "eval_report.json").write_text("{}")
    with pytest.raises(SystemExit):
        main("evaluate", [f"audio={SAMPLE}", f"out={tmp_path}", *CHEAP])
    assert "overwrite=true" in capsys.readouterr().err
    shutil.rmtree(tmp_path)
