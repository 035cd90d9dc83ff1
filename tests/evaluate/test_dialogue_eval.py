"""``python -m elise.evaluate ckpt=... dialogue_file=/dialogue=`` on the tiny checkpoint: every turn of every
conversation is generated with the earlier turns as context and scored, items carry conversation and turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from evalkit import SAMPLE
from testkit import record_bases

from elise.cli import main
from elise.evaluate import evaluate_dialogue
from elise.synthesis.dialogue import parse_script

SPF = 1920
FAST = ["codec=tiny", "max_audio_seconds=0.4", "metrics=[eos,duration_ratio,rtf]", "progress=false"]


def test_a_folder_of_scripts_is_generated_and_every_turn_scored(tiny_ckpt: Path, tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "morning.txt").write_text(
        "# two friends\n0: Good morning.\n1: Morning to you!\n\n0: Coffee?\n"
    )
    (scripts / "night.txt").write_text("1: Good night.\n")
    out = tmp_path / "ev"
    main("evaluate", [f"ckpt={tiny_ckpt}", f"dialogue_file={scripts}", f"out={out}", "seed=5", *FAST])
    report = json.loads((out / "eval_report.json").read_text())
    items = report["items"]
    assert [(r["id"], r["conversation"], r["turn"], r["text"]) for r in items] == [
        ("morning/001", "morning", 1, "Good morning."), ("night/001", "night", 1, "Good night."),
        ("morning/002", "morning", 2, "Morning to you!"), ("morning/003", "morning", 3, "Coffee?"),
    ]  # fmt: skip  # round k holds turn k of every conversation
    assert all(r["eos"] is False and "cut" in r["flags"] and r["rtf"] > 0 for r in items)  # random heads
    assert report["summary"]["counts"]["items"] == 4
    tl = report["conversations"]["morning"]
    assert [t["context"] for t in tl["turns"]] == [[], [1], [1, 2]]  # every earlier turn in the prompt
    assert [t["seed"] for t in tl["turns"]] == [6, 7, 8]  # synthesize.py's seeds for conversation 0
    wav, sr = sf.read(out / "morning" / "conversation.wav")
    assert wav.size == sum(t["frames"] for t in tl["turns"]) * SPF + 2 * round(0.15 * sr)
    assert wav.size == round(tl["seconds"] * sr)
    turn = out / "morning" / "turns" / "002_1.wav"
    assert sf.info(turn).frames == tl["turns"][1]["frames"] * SPF
    assert turn.with_suffix(".txt").read_text() == "Morning to you!\n"
    assert json.loads((out / "morning" / "timeline.json").read_text()) == tl
    table = (out / "eval_report.md").read_text().split("## Conversations\n\n", 1)[1].split("\n\n")[0]
    rows = table.splitlines()
    assert rows[0] == "| conversation | turns | seconds | duration ratio | RTF | EOS rate | cut | long |"
    for row, name in zip(rows[2:], ("morning", "night"), strict=True):  # one row per conversation
        turns = [r for r in items if r["conversation"] == name]
        ratio = sum(r["duration_ratio"] for r in turns) / len(turns)
        long = sum("long" in r["flags"] for r in turns)
        seconds = report["conversations"][name]["seconds"]
        assert row.startswith(f"| {name} | {len(turns)} | {seconds:.2f} | {ratio:.3f} | ")
        assert row.endswith(f" | 0.00 | {len(turns)} | {long} |")  # no turn ended: all cut


def test_a_voice_with_a_clip_is_sim_scored_against_it(tiny_ckpt: Path, tmp_path: Path) -> None:
    clip = SAMPLE / "wavs" / "sample_000.flac"
    script = parse_script("alice: Hello there.\n0: Hi.\nalice: Bye.")
    report = evaluate_dialogue(str(tiny_ckpt), [script], tmp_path / "ev", {"alice": {"audio": str(clip), "text": "Hi."}},
                               codec="tiny", metrics=["sim", "eos"], sim="resemblyzer", max_audio_seconds=0.4,
                               context_turns=1)  # fmt: skip
    items = report["items"]
    assert [r["reference"] for r in items] == [str(clip), None, str(clip)]
    assert items[0]["sim"] is not None and items[1]["sim"] is None
    assert [t["context"] for t in report["conversations"]["conversation"]["turns"]] == [[], [1], [2]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dialogue=0: Hi.\\nno colon"], "dialogue line 2: no colon"),
        (["dialogue=zed: Hi."], "line 1: unknown speaker 'zed'"),
        (["dialogue_file=/no/such/script.txt"], "dialogue_file not found"),
        (["dialogue=0: Hi.", "reference_audio=a.wav"], "give the speakers voices="),
        (["dialogue=0: Hi.", "context_turns=-1"], "context_turns=-1"),
    ],
)
def test_bad_dialogues_are_one_line_errors(tiny_ckpt: Path, tmp_path: Path, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main("evaluate", [f"ckpt={tiny_ckpt}", *args, f"out={tmp_path / 'o'}", *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_base_reaches_the_loader(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    seen = record_bases(monkeypatch)
    texts = tmp_path / "set.txt"
    texts.write_text("One line.\n")
    main(
        "evaluate",
        [f"ckpt={tiny_ckpt}", "base=/a/base.ckpt", f"eval_set={texts}", f"out={tmp_path / 'a'}", *FAST],
    )
    main(
        "evaluate",
        [f"ckpt={tiny_ckpt}", "base=/a/base.ckpt", "dialogue=0: Hi.", f"out={tmp_path / 'b'}", *FAST],
    )
    assert seen == ["/a/base.ckpt", "/a/base.ckpt"]
