"""The synthesis engine (requests in, audio out) and the synthesize.py promises around it: full-length
sampled speech from a trained model, the same audio whatever batch_size, speakers by name, inputs
checked before any model loads, nothing written in the working directory when output= is given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_synthesize import config
from testkit import save_tiny

from elise.codec import build_codec
from elise.layout import NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model import build_model
from elise.model.loss import csm_loss
from elise.synthesis import Request, Settings, SynthesisError, Synthesizer, resolve_speaker
from elise.synthesize import run
from elise.text import ByteTokenizer, encode_prompt

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Hello there, how are you today?", "The weather is lovely this morning.", "Good night."]
FRAMES = [22, 25, 10]  # the "training clips" (random codes) of TEXTS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def trained() -> Synthesizer:
    """The test-size model overfit on three clips (200 Adam steps, ~20 s on one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = build_model("test"), ByteTokenizer()
    g = torch.Generator().manual_seed(0)
    rows = [
        segment_rows(
            encode_prompt(tok, t, 0), torch.randint(1, 2048, (NUM_CODEBOOKS, n), generator=g), eos=True
        )
        for t, n in zip(TEXTS, FRAMES, strict=True)
    ]
    tokens, mask = pad_rows(rows)  # [3, S, 33] x2
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = csm_loss(model, tokens, mask, 0.25).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return Synthesizer(model.eval(), tok, build_codec("tiny"), Settings(split_sentences=False))


def test_sampled_speech_of_a_trained_model_lasts_as_long_as_its_clip(trained):
    """Sampled at the defaults (temperature 0.9, top-k 50), every training sentence is spoken at least
    0.7x its clip's length: EOS is judged on the greedy choice, not drawn at every frame."""
    for seed in (0, 1):
        trained.settings.seed = seed
        results = trained.synthesize(TEXTS)
        ratios = [r.metrics["frames"] / n for r, n in zip(results, FRAMES, strict=True)]
        assert min(ratios) >= 0.7, ratios
        assert all(r.audio.numel() == r.metrics["frames"] * 1920 for r in results)


def test_same_seed_same_audio_whatever_the_batch_size(trained):
    trained.settings.seed = 5
    audio = {}
    for bs in (1, 3):
        trained.settings.batch_size = bs
        audio[bs] = [r.audio for r in trained.synthesize(TEXTS)]
    trained.settings.batch_size = 1
    for one, batched in zip(audio[1], audio[3], strict=True):
        assert one.shape == batched.shape
        torch.testing.assert_close(one, batched, atol=1e-4, rtol=0)


def test_stream_yields_the_audio_of_synthesize(trained):
    trained.settings.seed = 2
    [full] = trained.synthesize([Request(TEXTS[2])])
    chunks = list(trained.stream(Request(TEXTS[2])))
    assert len(chunks) > 1
    torch.testing.assert_close(torch.cat(chunks), full.audio, atol=2e-4, rtol=0)


def test_speakers_by_name():
    speakers = {"alice": 3, "bob": 7}
    assert resolve_speaker("alice", speakers) == 3 and resolve_speaker(7, speakers) == 7
    assert resolve_speaker("7", speakers) == 7 and resolve_speaker(0, {}) == 0
    with pytest.raises(SynthesisError, match=r"unknown speaker 'carol'; known: alice \(3\), bob \(7\)"):
        resolve_speaker("carol", speakers)
    with pytest.raises(SynthesisError, match="known: alice"):
        resolve_speaker(4, speakers)


def one_line_error(cfg, match: str) -> None:
    with pytest.raises(SynthesisError, match=match) as err:
        run(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "not found"),
        ("short", "at least 1 s"),
        ("silent", "is silent"),
        ("long", "reference_max_seconds"),
        ("unreadable", "cannot read reference audio"),
        ("counts", "2 reference_audio file"),
        ("text_dir", "is a directory"),
        ("max_audio", "max_audio_seconds=0.0 must be > 0"),
    ],
)
def test_inputs_checked_before_the_model_loads(tmp_path, case, match):
    """Every input error names itself in one line; the checkpoint does not even exist."""
    rng = np.random.default_rng(0)
    clip = tmp_path / "ref.wav"
    seconds = {"short": 0.5, "long": 4.0}.get(case, 2.0)
    wav = (
        np.zeros(int(24_000 * seconds))
        if case == "silent"
        else 0.3 * rng.standard_normal(int(24_000 * seconds))
    )
    sf.write(clip, wav, 24_000)
    values: dict = {"text": "Hi there.", "output": str(tmp_path / "o.wav"), "reference_text": "Words",
                    "reference_audio": str(clip), "reference_max_seconds": 3}  # fmt: skip
    if case == "missing":
        values["reference_audio"] = str(tmp_path / "nope.wav")
    if case == "unreadable":
        (tmp_path / "bad.wav").write_bytes(b"not audio at all")
        values["reference_audio"] = str(tmp_path / "bad.wav")
    if case == "counts":
        values.update(reference_audio=[str(clip), str(clip)], reference_text=["a"])
    if case == "text_dir":
        values.update(text=None, text_file=str(tmp_path), output=None, output_dir=str(tmp_path / "out"))
    if case == "max_audio":
        values["max_audio_seconds"] = 0.0
    one_line_error(config(tmp_path / "absent.ckpt", **values), match)


def test_unknown_speaker_is_an_error(ckpt, tmp_path):
    one_line_error(config(ckpt, text="Hi.", output=str(tmp_path / "o.wav"), speaker="alice"), "speaker")


def test_existing_output_needs_overwrite(ckpt, tmp_path):
    out = tmp_path / "o.wav"
    run(config(ckpt, text="Hi.", output=str(out)))
    one_line_error(config(ckpt, text="Hi.", output=str(out)), "overwrite=true")
    assert run(config(ckpt, text="Hi.", output=str(out), overwrite=True))[0]["path"] == str(out)


def test_long_text_reports_progress(ckpt, tmp_path, caplog):
    caplog.set_level("INFO", logger="elise.synthesis.engine")
    run(config(ckpt, text="One sentence here. Another one here. And a third.", output=str(tmp_path / "o.wav"),
               max_audio_seconds=0.08))  # fmt: skip
    assert [r.getMessage() for r in caplog.records if "pieces" in r.getMessage()] == [
        "pieces 1/3 done", "pieces 2/3 done", "pieces 3/3 done"
    ]  # fmt: skip


def test_compile_on_cpu_warns_up_front(ckpt, caplog, monkeypatch):
    from elise.model.csm import CSM
    from elise.synthesis import runtime

    monkeypatch.setattr(CSM, "compile_steps", lambda self: None)
    model = runtime.load(str(ckpt), torch.device("cpu")).model
    runtime.prepare_model(model, torch.float32, compile=True)
    assert any("compile=true on CPU" in r.getMessage() for r in caplog.records)


def test_read_only_working_directory(ckpt, tmp_path):
    """output= elsewhere: synthesize.py writes nothing in the (read-only) working directory."""
    cwd, out = tmp_path / "ro", tmp_path / "w" / "o.wav"
    cwd.mkdir()
    cwd.chmod(0o555)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(ROOT / "synthesize.py"), f"ckpt={ckpt}", "text=Hello.", f"output={out}",
            "codec=tiny", "max_audio_seconds=0.2", "device=cpu"]  # fmt: skip
    try:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert out.is_file() and not any(cwd.iterdir())
    finally:
        cwd.chmod(0o755)


def test_default_output_folder_only_without_output(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(config(ckpt, text="Hi.", output=str(tmp_path / "a" / "o.wav")))
    assert not (tmp_path / "outputs").exists()
    [m] = run(config(ckpt, text="Hi."))
    folder = Path(m["path"]).parent
    assert folder.parent == Path("outputs") / "synth" and (folder / "synthesize.log").is_file()


def test_training_samples_come_from_the_engine(tmp_path):
    """AudioSamples synthesizes through the engine at the users' defaults and writes through elise.data.audio."""
    from types import SimpleNamespace

    from elise.callbacks import AudioSamples

    model, tok = build_model("tiny").eval(), ByteTokenizer()
    cb = AudioSamples({"name": "tiny"}, max_frames=3, seed=0)
    assert (cb.settings.temperature, cb.settings.top_k) == (Settings().temperature, Settings().top_k)
    examples = [SimpleNamespace(text=t, text_ids=encode_prompt(tok, t, 0)) for t in ("Hi.", "Bye now.")]
    paths = cb.write_samples(model, examples, tmp_path, 7)
    assert [p.name for p in paths] == ["step0000007_0.wav", "step0000007_1.wav"]
    assert all(sf.info(p).samplerate == 24_000 and sf.info(p).frames % 1920 == 0 for p in paths)
