"""``elise.export``: a complete transformers directory, the codec it was trained on, no silent overwrite."""

from __future__ import annotations

import json
import os
import stat
import warnings

import numpy as np
import pytest
import torch

from elise.checkpoints import load_model
from elise.codec import codec_identity
from elise.export import ExportError, export_checkpoint
from elise.model import build_model
from elise.module import EliseModule

transformers = pytest.importorskip("transformers")


def write_checkpoint(path, codec, speakers=None, seed=0):
    """A tiny elise checkpoint recording ``codec`` (heads scaled so greedy argmaxes are well separated)."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        model.codebook0_head.weight.normal_(std=1.0)
        model.audio_head.normal_(std=1.0)
    module = EliseModule(model=model.cfg.to_dict(), codec=codec, speakers=speakers or {})
    module.model.load_state_dict(model.state_dict())
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 1}, path
    )
    return path


TINY = codec_identity("tiny", {"seed": 0})
MIMI_RANDOM = codec_identity("mimi_random", {"seed": 0, "num_codebooks": 32})


def test_tiny_model_exports_without_a_mimi_codec_and_records_codec_and_speakers(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", TINY, {"alice": 0, "bob": 1})
    files = export_checkpoint(ckpt, tmp_path / "out")
    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "elise.json"} <= names
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "codec_config" not in config  # issue 10.2: no Mimi config for a model of another codec
    record = json.loads((tmp_path / "out" / "elise.json").read_text())
    assert record["codec"] == TINY and record["speakers"] == {"alice": 0, "bob": 1}
    back = load_model(tmp_path / "out")  # the record comes back with the directory
    assert back.codec == TINY and back.speakers == {"alice": 0, "bob": 1}
    with pytest.raises(ExportError, match="trained on codec=tiny, not Mimi"):
        export_checkpoint(ckpt, tmp_path / "out2", codec_config={"model_type": "mimi"})


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", TINY)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass overwrite=true"):
        export_checkpoint(ckpt, tmp_path / "out")
    (tmp_path / "out" / "notes.txt").chmod(0o600)
    files = export_checkpoint(ckpt, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # only our files are replaced
    assert "notes.txt" not in {f.name for f in files}  # not ours: not listed, its mode kept
    assert stat.S_IMODE((tmp_path / "out" / "notes.txt").stat().st_mode) == 0o600


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """The transformers writer itself (``export_transformers_dir``, also used by the benchmark) sets
    the modes: safetensors writes 0600 whatever the umask."""
    from elise.interop import export_transformers_dir
    from elise.text import ByteTokenizer

    previous = os.umask(umask)
    try:
        files = export_transformers_dir(build_model("tiny"), ByteTokenizer(), tmp_path / "out")
    finally:
        os.umask(previous)
    assert sorted(f.name for f in files) == [
        "config.json",
        "elise.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f.name for f in files
    )  # no stage left
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}


def test_exported_config_loads_without_token_id_warnings(tmp_path, caplog):
    """CsmConfig's default pad/audio ids are Llama-3 ids: out of range for the byte vocabulary."""
    export_checkpoint(write_checkpoint(tmp_path / "m.ckpt", TINY), tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = transformers.CsmConfig.from_pretrained(tmp_path / "out")
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "token_id" in m], messages
    assert config.pad_token_id == 0 and config.bos_token_id == 1


@pytest.mark.slow  # builds the real Mimi architecture twice and runs both generators (~1 min on 2 cores)
def test_mimi_model_export_gives_transformers_the_same_greedy_audio(tmp_path):
    """The transformers recipe (AutoProcessor + generate(output_audio=True), greedy) on the export of a
    model trained on mimi_random gives elise's greedy codes exactly and its audio to the wav's 16-bit
    step (measured max diff 2.0e-5)."""
    from elise.config import compose
    from elise.synthesize import run

    ckpt = write_checkpoint(tmp_path / "m.ckpt", MIMI_RANDOM)
    export_checkpoint(ckpt, tmp_path / "out")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    hf, info = transformers.CsmForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]  # codec_model.* included
    inputs = processor("[0]Hello there.", add_special_tokens=True, return_tensors="pt")
    frames = 10
    greedy = dict(do_sample=False, depth_decoder_do_sample=False, max_new_tokens=frames)
    with torch.no_grad():
        codes = hf.eval().generate(**inputs, **greedy)  # [1, F, 32]
        audio = hf.generate(**inputs, output_audio=True, **greedy)[0].float().flatten().numpy()

    cfg = compose("synthesize", [])
    settings = {
        "ckpt": str(ckpt), "text": "Hello there.", "top_k": 1, "seed": 0, "device": "cpu",
        "max_audio_seconds": frames / 12.5, "save_codes": True, "output": str(tmp_path / "e.wav"),
    }  # fmt: skip
    for key, value in settings.items():
        cfg[key] = value
    run(cfg)  # no codec=: the recorded mimi_random (seed 0) decodes
    import soundfile as sf

    ours, _ = sf.read(tmp_path / "e.wav", dtype="float32")
    assert np.array_equal(np.load(tmp_path / "e.codes.npy"), codes[0].T.numpy())
    assert ours.shape == audio.shape
    assert np.abs(ours - audio).max() < 1e-4
