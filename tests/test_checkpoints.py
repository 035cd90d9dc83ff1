"""The checkpoint loader: plain-data only, one-line errors, the elise checkpoint contract."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from elise.checkpoints import (
    CheckpointError,
    inspect_checkpoint,
    load_model,
    resolve_ckpt_path,
    torch_load_checked,
)
from elise.model import build_model


def write_contract_checkpoint(path, tokenizer="bytes"):
    model = build_model("tiny")
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": model.cfg.to_dict(), "tokenizer": tokenizer},
            "global_step": 7,
        },
        path,
    )
    return model


def test_loads_contract_checkpoint(tmp_path):
    model = write_contract_checkpoint(tmp_path / "a.ckpt")
    loaded = load_model(tmp_path / "a.ckpt")
    assert loaded.source == "elise" and loaded.meta["global_step"] == 7
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.tokenizer.encode("a") == [1, ord("a") + 3, 2]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/elise_pwned",))


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "x": Payload()}, path)
    if os.path.exists("/tmp/elise_pwned"):
        os.remove("/tmp/elise_pwned")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    assert not os.path.exists("/tmp/elise_pwned")


def test_raw_pickle_file_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not os.path.exists("/tmp/elise_pwned")


def _crafted(tmp_path, kind):
    """A file of each kind a user meets instead of a good checkpoint."""
    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"hello, not a checkpoint")
    elif kind in ("truncated", "corrupt"):
        write_contract_checkpoint(tmp_path / "good.ckpt")
        data = bytearray((tmp_path / "good.ckpt").read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:  # the zip directory intact, a member's pickled bytes overwritten
            start = data.index(b"data.pkl") + 40
            data[start : start + 64] = b"\xff" * 64
        path.write_bytes(bytes(data))
    elif kind == "code":
        torch.save({"state_dict": {}, "x": Payload()}, path)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps(Payload()))
    elif kind == "not_checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize(
    "kind,match",
    [
        ("empty", r"is empty \(0 bytes\)"),
        ("garbage", "is not a checkpoint"),
        ("truncated", "is truncated or corrupt"),
        ("corrupt", "is truncated or corrupt"),
        ("code", r"refusing to load .*contains pickled code \(posix.system\)"),
        ("raw_pickle", r"refusing to load .*contains pickled code"),
        ("not_checkpoint", "not an elise checkpoint"),
    ],
)
def test_bad_files_say_what_they_are_in_one_line(tmp_path, kind, match):
    """Each kind of bad file is named (issue 10.8); torch's advice to load with weights_only=False
    is never repeated."""
    path = _crafted(tmp_path, kind)
    with pytest.raises(CheckpointError, match=match) as e:
        torch_load_checked(path) if kind != "not_checkpoint" else load_model(path)
    message = str(e.value)
    assert "\n" not in message and "weights_only" not in message and "holds code" not in message
    if kind not in ("code", "raw_pickle"):
        assert "pickled code" not in message


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.ckpt")


def test_inspect_and_resolve_last_live_in_checkpoints(tmp_path):
    """``last`` skips a truncated newest file and picks the previous readable one."""
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    write_contract_checkpoint(run / "a.ckpt")
    bad = _crafted(tmp_path, "truncated")
    os.replace(bad, run / "b.ckpt")
    os.utime(run / "a.ckpt", (1, 1))
    assert resolve_ckpt_path("last", tmp_path / "run").endswith("a.ckpt")
    assert inspect_checkpoint(run / "a.ckpt")["global_step"] == 7
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        resolve_ckpt_path("last", tmp_path / "empty_run")


def test_checkpoint_records_codec_and_speakers(tmp_path):
    """The reader hands back the codec identity and speaker map the module saved in its hparams."""
    from elise.codec import codec_identity
    from elise.module import EliseModule

    identity = codec_identity("tiny", {"seed": 3, "dim": 16, "device": "cpu", "batch_size": 4})
    assert identity == {"name": "tiny", "config": {"seed": 3, "dim": 16}, "weights_sha256": None}
    module = EliseModule(
        model=build_model("tiny").cfg.to_dict(), codec=identity, speakers={"alice": 0, "bob": 1}
    )
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 1},
        tmp_path / "m.ckpt",
    )
    loaded = load_model(tmp_path / "m.ckpt")
    assert loaded.codec == identity and loaded.speakers == {"alice": 0, "bob": 1}


def test_codec_identity_hashes_a_weights_file(tmp_path):
    import hashlib

    from elise.codec import codec_identity

    weights = tmp_path / "mimi.safetensors"
    weights.write_bytes(b"not really weights")
    identity = codec_identity("mimi", {"weights": str(weights), "num_codebooks": 32})
    assert identity["weights_sha256"] == hashlib.sha256(b"not really weights").hexdigest()


def test_check_codec_defaults_to_recorded_and_warns_on_a_different_one():
    from elise.codec import check_codec

    recorded = {"name": "tiny", "config": {"seed": 0}, "weights_sha256": None}
    assert check_codec(recorded, None) == ("tiny", None)
    assert check_codec(recorded, "tiny") == ("tiny", None)
    name, warning = check_codec(recorded, "mimi_random")
    assert name == "mimi_random" and "codec=mimi_random" in warning and "codec=tiny" in warning
    assert "\n" not in warning
    name, warning = check_codec(None, "mimi_random")  # an older checkpoint: what was asked, said once
    assert name == "mimi_random" and "does not record its codec" in warning


def test_weights_sha256_hashes_once_per_path_size_and_mtime(tmp_path, monkeypatch):
    """A LoRA base is hashed at every load of its checkpoints: the hash is cached by the files' path,
    size and mtime, in memory and in ``$ELISE_CACHE_DIR/weights_sha256.json`` (a new process)."""
    import hashlib
    import json

    from elise import checkpoints

    monkeypatch.setenv("ELISE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoints, "_SHA_CACHE", {})
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(checkpoints.hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    base = tmp_path / "base.ckpt"
    base.write_bytes(b"weights one")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"tensors")
    folder_sha = real(b"config.json\0{}model.safetensors\0tensors").hexdigest()

    assert checkpoints.weights_sha256(base) == real(b"weights one").hexdigest()
    assert checkpoints.weights_sha256(folder) == folder_sha
    assert len(reads) == 2
    assert checkpoints.weights_sha256(base) == real(b"weights one").hexdigest()
    assert checkpoints.weights_sha256(folder) == folder_sha and len(reads) == 2  # in memory
    checkpoints._SHA_CACHE.clear()  # a new process: the file on disk answers
    assert checkpoints.weights_sha256(str(base)) == real(b"weights one").hexdigest() and len(reads) == 2
    assert len(json.loads((tmp_path / "cache" / "weights_sha256.json").read_text())) == 2

    mtime = base.stat().st_mtime_ns
    base.write_bytes(b"weights two")  # same size, new bytes
    os.utime(base, ns=(mtime + 10**9, mtime + 10**9))
    assert checkpoints.weights_sha256(base) == real(b"weights two").hexdigest() and len(reads) == 3
    (folder / "model.safetensors").write_bytes(b"tensors, more")
    assert checkpoints.weights_sha256(folder) != folder_sha and len(reads) == 4

    # another base of the same size copied over the path with its mtime kept (cp -p, rsync -a)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"weights 333")
    kept = base.stat().st_mtime_ns
    os.utime(other, ns=(kept, kept))
    os.replace(other, base)
    assert base.stat().st_size == len(b"weights two") and base.stat().st_mtime_ns == kept
    assert checkpoints.weights_sha256(base) == real(b"weights 333").hexdigest() and len(reads) == 5


def test_a_read_only_cache_dir_still_hashes(tmp_path, monkeypatch):
    from elise import checkpoints

    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("ELISE_CACHE_DIR", str(tmp_path / "file" / "cache"))  # cannot be created
    monkeypatch.setattr(checkpoints, "_SHA_CACHE", {})
    (tmp_path / "w.ckpt").write_bytes(b"w")
    import hashlib

    assert checkpoints.weights_sha256(tmp_path / "w.ckpt") == hashlib.sha256(b"w").hexdigest()
