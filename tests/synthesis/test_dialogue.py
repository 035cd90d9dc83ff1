"""Conversations (``dialogue=`` / ``dialogue_file=``) on the tiny model and codec: the timeline, the
joined wav, every turn's prompt holding the previous turns' codes, seeds, batches of conversations,
the position budget, streaming, voices, and one-line errors naming the script line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_synthesize import config
from testkit import tone

import elise.synthesis.engine as engine
from elise.cli import verbatim_args
from elise.codec import build_codec
from elise.config import compose
from elise.evaluate.sources import Skipped, read_audio_items
from elise.layout import EOS_CODE, NUM_CODEBOOKS
from elise.synthesis import Segment, Settings, SynthesisError, Synthesizer, build_prompt
from elise.synthesis.dialogue import converse, encode_voices, parse_script, read_scripts, read_voices
from elise.synthesis.text import LengthBound
from elise.synthesize import main, run

SPF, SR = 1920, 24_000
SCRIPT = """# two speakers
alice: Hi Bob, how are you?

bob: Fine, thanks. And you?
alice: Great: the weather is lovely.
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one torch thread (two oversubscribe OpenMP)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("voices")
    sf.write(folder / "alice.wav", tone(1.5, freq=220), 16_000)
    sf.write(folder / "bob.wav", tone(1.2, freq=330), 16_000)
    (folder / "alice.txt").write_text("Hello, I am Alice.", encoding="utf-8")
    (folder / "bob.txt").write_text("I am Bob.", encoding="utf-8")
    return {
        "alice": {"audio": str(folder / "alice.wav"), "text": "Hello, I am Alice."},
        "bob": {"audio": str(folder / "bob.wav"), "text": "I am Bob."},
        "folder": str(folder),
    }


def dialogue(tiny_ckpt: Path, tmp_path: Path, clips: dict, name: str = "out", **values):
    script = tmp_path / "script.txt"
    script.write_text(SCRIPT, encoding="utf-8")
    pair = {k: clips[k] for k in ("alice", "bob")}
    base = dict(
        dialogue_file=str(script), voices=pair, output_dir=str(tmp_path / name), max_audio_seconds=0.4
    )
    return config(tiny_ckpt, **{**base, **values})


def test_parse_script_lines_comments_and_colons_in_text():
    script = parse_script(SCRIPT, "s.txt")
    assert [(t.line, t.speaker, t.text) for t in script.turns] == [
        (2, "alice", "Hi Bob, how are you?"),
        (4, "bob", "Fine, thanks. And you?"),
        (5, "alice", "Great: the weather is lovely."),
    ]
    [inline] = read_scripts("0: Hello there.\\n1: Hi!", None)  # a typed \n separates inline turns
    assert [(t.speaker, t.text) for t in inline.turns] == [("0", "Hello there."), ("1", "Hi!")]


@pytest.mark.parametrize(
    ("script", "match"),
    [
        ("alice: Hi.\nthis line has no colon\n", "script.txt line 2: no colon"),
        ("# c\n\nalice: Hi.\nbob:   \n", "script.txt line 4: speaker 'bob' has no text"),
        (": who says this?\n", "script.txt line 1: no speaker before the colon"),
        (
            "alice: Hi.\ncarol: Hello!\n",
            r"script.txt line 2: unknown speaker 'carol' \(voices: alice, bob; .*no speaker names",
        ),
        ("# only a comment\n\n", "script.txt has no turns"),
    ],
)
def test_malformed_scripts_are_one_line_errors_naming_the_line(
    tiny_ckpt, tmp_path, voices, capsys, script, match
):
    cfg = dialogue(tiny_ckpt, tmp_path, voices)
    (tmp_path / "script.txt").write_text(script, encoding="utf-8")
    with pytest.raises(SynthesisError, match=match):
        run(cfg)
    with pytest.raises(SystemExit) as exit_:  # python synthesize.py: one line on stderr, exit code 2
        main(cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "line" in err


def test_two_speakers_timeline_joined_wav_and_turn_files(tiny_ckpt, tmp_path, voices):
    rows = run(dialogue(tiny_ckpt, tmp_path, voices, pause_ms=100, save_codes=True))
    out = tmp_path / "out"
    line = json.loads((out / "timeline.json").read_text())
    turns = line["turns"]
    assert [(t["turn"], t["speaker"], t["line"]) for t in turns] == [
        (1, "alice", 2),
        (2, "bob", 4),
        (3, "alice", 5),
    ]
    assert [t["speaker_id"] for t in turns] == [0, 1, 0]  # voices get ids in the order given
    assert all(r[k] == v for r, t in zip(rows, turns, strict=True) for k, v in t.items() if k != "wav")
    # 0.4 s = 5 frames a turn (random heads never emit EOS); turns follow each other with 100 ms pauses
    assert [t["frames"] for t in turns] == [5, 5, 5] and not any(t["eos"] for t in turns)
    for prev, cur in zip(turns, turns[1:], strict=False):
        assert cur["start"] == pytest.approx(prev["end"] + 0.1) and cur["end"] > cur["start"]
    joined, sr = sf.read(out / "conversation.wav", dtype="float32")
    lengths = [sf.info(out / t["wav"]).frames for t in turns]
    assert sr == SR and lengths == [5 * SPF] * 3
    assert (
        joined.shape[0]
        == sum(lengths) + 2 * 2400
        == round(turns[-1]["end"] * SR)
        == round(line["seconds"] * SR)
    )
    for t in turns:  # each turn sits at its start in the joined wav
        start = round(t["start"] * SR)
        piece, _ = sf.read(out / t["wav"], dtype="float32")
        np.testing.assert_array_equal(joined[start : start + piece.shape[0]], piece)
        assert np.load((out / t["wav"]).with_suffix(".codes.npy")).shape == (NUM_CODEBOOKS, t["frames"])
    assert [t["context"] for t in turns] == [[], [1], [1, 2]]
    # python -m elise.evaluate audio=<out>/turns scores the turns: each wav has its text beside it
    items = read_audio_items(out / "turns", Skipped())
    assert [(Path(i.wav).name, i.text) for i in items] == [(Path(t["wav"]).name, t["text"]) for t in turns]


def test_overlapping_turns_are_summed(tiny_ckpt, tmp_path, voices):
    rows = run(dialogue(tiny_ckpt, tmp_path, voices, overlap_ms=100))
    out = tmp_path / "out"
    joined = sf.read(out / "conversation.wav", dtype="float32")[0]
    assert joined.shape[0] == 3 * 5 * SPF - 2 * 2400  # three 0.4 s turns, two 0.1 s overlaps
    assert [r["start"] for r in rows] == [0.0, 0.3, 0.6] and [r["end"] for r in rows] == [0.4, 0.7, 1.0]
    placed = np.zeros_like(joined)
    for r in rows:
        start = round(r["start"] * SR)
        turn = sf.read(r["path"], dtype="float32")[0]
        placed[start : start + turn.shape[0]] += turn
    assert np.abs(joined - np.clip(placed, -1, 1)).max() < 3 / 32768  # 16-bit rounding of the parts
    assert json.loads((out / "timeline.json").read_text())["overlap_ms"] == 100
    with pytest.raises(SynthesisError, match="overlap_ms needs stream=false"):
        run(dialogue(tiny_ckpt, tmp_path, voices, "s", overlap_ms=100, stream=True))


def test_same_seed_same_conversation(tiny_ckpt, tmp_path, voices):
    def sample(name: str, seed: int) -> bytes:
        run(dialogue(tiny_ckpt, tmp_path, voices, name, seed=seed, top_k=50, temperature=1.0))
        return (tmp_path / name / "conversation.wav").read_bytes()

    assert sample("a", 3) == sample("b", 3)
    assert sample("c", 4) != (tmp_path / "a" / "conversation.wav").read_bytes()


def synth(tiny_ckpt: Path, **values) -> Synthesizer:
    return Synthesizer.load(str(tiny_ckpt), codec="tiny", settings=Settings(top_k=1, **values))


def test_turn_prompts_hold_the_voices_and_previous_turns(tiny_ckpt, voices, monkeypatch):
    prompts = []
    generate = engine.generate

    def spy(model, tokens, mask, limits, *args, **kwargs):
        prompts.append((tokens.clone(), mask.clone()))
        return generate(model, tokens, mask, limits, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    s = synth(tiny_ckpt, max_audio_seconds=0.4)
    vs = read_voices({k: voices[k] for k in ("alice", "bob")})
    encode_voices(vs, s.codec)
    [conv] = converse(s, [parse_script(SCRIPT)], vs)
    voice_prompt = vs["alice"].prompt + vs["bob"].prompt
    assert conv.audio(SR).numel() == conv.length == 3 * 5 * SPF + 2 * 3600  # turns joined by 150 ms pauses
    assert len(prompts) == 3 and all(t.codes.shape == (NUM_CODEBOOKS, 5) for t in conv.turns)
    for k, turn in enumerate(conv.turns):
        previous = [Segment(t.text, t.speaker_id, t.codes) for t in conv.turns[:k]]
        expected = build_prompt(s.tokenizer, turn.text, turn.speaker_id, voice_prompt + previous)
        tokens, mask = prompts[k][0][0], prompts[k][1][0]
        assert torch.equal(tokens, expected[0]) and torch.equal(mask, expected[1])
        assert turn.prompt_rows == tokens.shape[0]
        if k:  # the rows just before this turn's text: the previous turn's codes, then its EOS row
            text_rows = len(s.tokenizer.encode(f"[{turn.speaker_id}]{turn.text}"))
            before = tokens[: tokens.shape[0] - text_rows]
            assert torch.equal(before[-6:-1, :NUM_CODEBOOKS], conv.turns[k - 1].codes.t())
            assert (before[-1, :NUM_CODEBOOKS] == EOS_CODE).all()


def test_long_script_stays_within_the_positions_and_logs_dropped_turns(tiny_ckpt, monkeypatch, caplog):
    calls = []
    generate = engine.generate

    def spy(model, tokens, mask, limits, *args, **kwargs):
        codes, lengths = generate(model, tokens, mask, limits, *args, **kwargs)
        calls.append(tokens.shape[1] + int(lengths.max()))  # positions the KV cache held
        return codes, lengths

    monkeypatch.setattr(engine, "generate", spy)
    s = synth(tiny_ckpt, max_audio_seconds=0.8)
    s.max_len = 140  # three earlier turns (35 rows each) + a turn's 24 text rows and 10 frames: 139
    script = parse_script("\n".join(f"{i % 2}: Turn number {i} here." for i in range(5)))
    with caplog.at_level("INFO", logger="elise.synthesis.dialogue"):
        [conv] = converse(s, [script])
    assert max(calls) <= 140 and all(t.codes.shape[1] == 10 for t in conv.turns)  # never cut for room
    assert [len(t.context) for t in conv.turns] == [0, 1, 2, 3, 3] and [t.dropped for t in conv.turns] == [
        0,
        0,
        0,
        0,
        1,
    ]
    assert all(t.context == list(range(t.turn - len(t.context), t.turn)) for t in conv.turns)  # latest kept
    dropped = [r.getMessage() for r in caplog.records if "left out of the context" in r.getMessage()]
    assert len(dropped) == sum(t.dropped > 0 for t in conv.turns) > 0
    [capped] = converse(s, [script], context_turns=1)
    assert [t.context for t in capped.turns] == [[]] + [[k] for k in range(1, 5)]
    # in a batch, prompts are left-padded to the longest: a long context must not take the frames of
    # another conversation's longer turn (the longest prompt gives up old turns instead)
    calls.clear()
    s.settings.batch_size, s.settings.max_audio_seconds = 2, None
    s.settings.bound = LengthBound(seconds_per_char=0.04, margin=1.0, extra_seconds=0.0)  # 0.5 frame/char
    longer = parse_script("\n".join(f"{i % 2}: Turn {i}, a much longer one here, yes." for i in range(5)))
    convs = converse(s, [script, longer])
    assert max(calls) <= 140
    assert [t.codes.shape[1] for t in convs[0].turns] == [10] * 5 and [
        t.codes.shape[1] for t in convs[1].turns
    ] == [18] * 5
    assert [t.context for t in convs[0].turns] == [[], [1], [1, 2], [2, 3], [3, 4]]  # alone: [1, 2, 3] ...


def test_planning_tokenizes_each_turn_once(tiny_ckpt, monkeypatch):
    """A long conversation's planning (which turns fit) tokenizes each earlier turn once, not once per
    later turn and per dropped turn: 30 turns, 30 + 29 tokenizations (was over 400)."""
    import elise.synthesis.dialogue as dialogue

    counted = []
    encode = dialogue.encode_prompt

    def spy(tokenizer, text, speaker):
        counted.append(text)
        return encode(tokenizer, text, speaker)

    def generate(requests, _on_chunk):  # no model: 3 frames of codes per turn
        codes = torch.ones(NUM_CODEBOOKS, 3, dtype=torch.long)
        return [engine.Result(torch.zeros(3 * SPF), SR, [codes], [True], {}) for _ in requests]

    monkeypatch.setattr(dialogue, "encode_prompt", spy)
    s = synth(tiny_ckpt)
    s.max_len = 200  # room for a few turns: the oldest are dropped again and again
    script = parse_script("\n".join(f"{i % 2}: Turn number {i} here." for i in range(30)))
    [conv] = converse(s, [script], generate=generate)
    assert sum(t.dropped for t in conv.turns) > 20  # planning had to drop turns
    assert len(counted) == 30 + 29  # each turn's text rows once, each earlier turn as context once


def test_folder_of_scripts_in_one_batch_equals_one_by_one(tiny_ckpt, tmp_path, voices):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "a.txt").write_text(SCRIPT, encoding="utf-8")
    (folder / "b.txt").write_text("bob: Short one.\nalice: And a reply here!\n", encoding="utf-8")
    wavs = {}
    for bs in (1, 2):
        rows = run(dialogue(tiny_ckpt, tmp_path, voices, f"bs{bs}", dialogue_file=str(folder), batch_size=bs))
        assert [(r["conversation"], r["turn"]) for r in rows] == [
            ("a", 1),
            ("b", 1),
            ("a", 2),
            ("b", 2),
            ("a", 3),
        ]
        wavs[bs] = [(tmp_path / f"bs{bs}" / n / "conversation.wav").read_bytes() for n in ("a", "b")]
        assert json.loads((tmp_path / f"bs{bs}" / "b" / "timeline.json").read_text())["turns"][1][
            "context"
        ] == [1]
    assert wavs[1] == wavs[2]


def test_stream_writes_the_same_conversation(tiny_ckpt, tmp_path, voices):
    run(dialogue(tiny_ckpt, tmp_path, voices, "full"))
    run(dialogue(tiny_ckpt, tmp_path, voices, "stream", stream=True, stream_chunk_frames=2))
    a = sf.read(tmp_path / "full" / "conversation.wav", dtype="int16")[0].astype(int)
    b = sf.read(tmp_path / "stream" / "conversation.wav", dtype="int16")[0].astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # decoding in chunks may round 1 LSB apart


def test_voices_folder_and_command_line_spelling(tiny_ckpt, tmp_path, voices):
    folder = read_voices(voices["folder"])
    assert {n: (v.speaker, v.clips[0][1]) for n, v in folder.items()} == {
        "alice": (0, "Hello, I am Alice."),
        "bob": (1, "I am Bob."),
    }
    args = [f"voices={{alice: {{audio: {voices['alice']['audio']}, text: 'Hi, it is me.', speaker: 1}}}}"]
    assert verbatim_args(args) == args  # a dict stays a dict; a folder is quoted like any path
    assert verbatim_args(["voices=my voices"]) == ["voices='my voices'"]
    cfg = compose("synthesize", verbatim_args(args))
    assert read_voices(dict(cfg.voices))["alice"].speaker == 1
    rows = run(dialogue(tiny_ckpt, tmp_path, voices, voices=voices["folder"], context_turns=0))
    assert [r["context"] for r in rows] == [[], [], []] and [r["speaker_id"] for r in rows] == [0, 1, 0]
    # the server's voices (elise.serve.voices: <name>.json + <name>.npy codes) are voices too
    folder = tmp_path / "served"
    folder.mkdir()
    codes = np.arange(NUM_CODEBOOKS * 4).reshape(NUM_CODEBOOKS, 4).astype(np.int16)
    np.save(folder / "bob.npy", codes)
    (folder / "bob.json").write_text(json.dumps({"text": "Bob here.", "speaker": 0, "codec": "other"}))
    [bob] = read_voices(str(folder)).values()
    with pytest.raises(SynthesisError, match="voice 'bob' was encoded with codec other, not tiny"):
        encode_voices({"bob": bob}, build_codec("tiny"))
    bob.stored.codec = build_codec("tiny").identity
    encode_voices({"bob": bob}, build_codec("tiny"))
    assert bob.prompt[0].text == "Bob here." and torch.equal(
        bob.prompt[0].codes, torch.from_numpy(codes).long()
    )
    with pytest.raises(SynthesisError, match="voices.alice: reference audio .* lasts 1.5 s; the limit"):
        run(dialogue(tiny_ckpt, tmp_path, voices, "x", reference_max_seconds=1.0))
    with pytest.raises(SynthesisError, match="not both"):
        run(dialogue(tiny_ckpt, tmp_path, voices, "y", text="Hello"))
