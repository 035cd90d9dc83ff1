"""The checkpoint loader: plain-data only, one-line errors, the elise checkpoint contract."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from elise.checkpoints import CheckpointError, load_model
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


@pytest.mark.parametrize(
    "content,match",
    [(None, "not found"), (b"", "unreadable"), (b"hello, not a checkpoint", "unreadable|refusing")],
)
def test_bad_files_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_truncated_checkpoint_is_reported(tmp_path):
    write_contract_checkpoint(tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "t.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path / "t.ckpt")


def test_not_an_elise_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="not an elise checkpoint"):
        load_model(tmp_path / "w.pt")
