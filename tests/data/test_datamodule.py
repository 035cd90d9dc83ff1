"""Collate layout, CodesDataset, and EliseDataModule on fake prepared Examples (prepare monkeypatched)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from elise.data.collate import collate
from elise.data.datamodule import EliseDataModule
from elise.data.dataset import CodesDataset
from elise.data.items import Example, PreparedData
from elise.layout import pad_rows, segment_rows


def _examples(root: Path, n: int = 40, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = int(rng.integers(2, 30))
        path = root / f"ex{i}.npy"
        np.save(path, rng.integers(1, 2048, (32, frames)).astype(np.int16))
        text_ids = [1] + rng.integers(3, 259, int(rng.integers(1, 20))).tolist() + [2]
        split = "val" if i % 8 == 0 else "train"
        out.append(Example(f"ex{i}", f"text {i}", i % 2, text_ids, str(path), frames, split))
    return out


# ---- collate -------------------------------------------------------------------------------


def test_collate_layout() -> None:
    items = [
        {"id": "a", "text_ids": [1, 50, 2], "codes": torch.arange(64).view(32, 2) + 1, "speaker": 0},
        {"id": "b", "text_ids": [1, 2], "codes": torch.full((32, 1), 7), "speaker": 3},
    ]
    out = collate(items)
    tokens, mask = out["tokens"], out["mask"]
    assert (
        tokens.shape == mask.shape == (2, 6, 33) and tokens.dtype == torch.long and mask.dtype == torch.bool
    )
    assert (
        out["lengths"].tolist() == [6, 4] and out["ids"] == ["a", "b"] and out["speakers"].tolist() == [0, 3]
    )
    # item a: 3 text rows, 2 audio rows, the EOS row
    assert mask[0, :3, 32].all() and not mask[0, :3, :32].any()
    assert tokens[0, :3, 32].tolist() == [1, 50, 2] and not tokens[0, :3, :32].any()
    assert mask[0, 3:5, :32].all() and not mask[0, 3:5, 32].any()
    assert torch.equal(tokens[0, 3:5, :32], items[0]["codes"].t())
    assert mask[0, 5, :32].all() and not mask[0, 5, 32] and not tokens[0, 5].any()  # EOS row: zeros
    # item b: padded rows 4..5 fully masked and zero
    assert not mask[1, 4:].any() and not tokens[1, 4:].any()
    assert mask[1, 3, :32].all() and not tokens[1, 3].any()


def test_collate_equals_layout_reference_and_takes_examples(tmp_path: Path) -> None:
    examples = _examples(tmp_path, n=6)
    out = collate(examples)
    ref_tokens, ref_mask = pad_rows([segment_rows(e.text_ids, e.load_codes(), eos=True) for e in examples])
    assert torch.equal(out["tokens"], ref_tokens) and torch.equal(out["mask"], ref_mask)
    assert out["lengths"].tolist() == [e.num_rows for e in examples]


def test_collate_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match=r"item x: codes must be \[32, T\]"):
        collate([{"id": "x", "text_ids": [1, 2], "codes": torch.zeros(8, 3, dtype=torch.long), "speaker": 0}])


# ---- dataset -------------------------------------------------------------------------------


def test_dataset_items_and_lengths(tmp_path: Path) -> None:
    examples = _examples(tmp_path, n=3)
    ds = CodesDataset(examples)
    assert len(ds) == 3 and ds.lengths == [e.num_rows for e in examples]
    item = ds[1]
    assert item["id"] == "ex1" and item["text_ids"] == examples[1].text_ids and item["speaker"] == 1
    assert item["codes"].dtype == torch.long and item["codes"].shape == (32, examples[1].frames)


def test_dataset_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    ex = _examples(tmp_path, n=1)[0]
    Path(ex.codes_path).write_bytes(b"not numpy")
    with pytest.raises(RuntimeError, match="cannot load codes of item 'ex0'"):
        CodesDataset([ex])[0]
    np.save(ex.codes_path, np.zeros((32, ex.frames + 1), np.int16))
    with pytest.raises(RuntimeError, match="expected \\[32, "):
        CodesDataset([ex])[0]


# ---- datamodule ----------------------------------------------------------------------------


@pytest.fixture
def fake_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace elise.data.prepare.prepare and elise.codec.build_codec; returns the recorded calls."""
    calls: list[dict] = []
    examples = _examples(tmp_path)

    def prepare(data_cfg, codec, tokenizer, strict=False, **kwargs):
        calls.append({"codec": codec, "strict": strict, "tokenizer": tokenizer, **kwargs})
        return PreparedData(list(examples), {"kept": len(examples), "skipped": {}}, tmp_path)

    monkeypatch.setitem(sys.modules, "elise.data.prepare", types.SimpleNamespace(prepare=prepare))
    import elise.codec

    monkeypatch.setattr(elise.codec, "build_codec", lambda **kw: ("codec", kw), raising=False)
    return calls


def _dm(**data) -> EliseDataModule:
    cfg = {"max_tokens": 200, "max_samples": 4, "num_workers": 0, "strict": True, **data}
    return EliseDataModule(cfg, {"name": "tiny"}, tokenizer_spec="bytes", seed=0)


def test_datamodule_batches(fake_prepare: list[dict]) -> None:
    dm = _dm()
    dm.prepare_data()
    dm.setup("fit")
    assert fake_prepare[0]["codec"] == ("codec", {"name": "tiny"}) and fake_prepare[0]["strict"] is True
    assert dm.tokenizer.vocab_size == 259 and dm.report["kept"] == 40 and len(dm.prepared.examples) == 40
    assert len(dm.train_set) == 35 and len(dm.val_set) == 5
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == len(train) > 0
    ids = []
    for batch in batches:
        B, S, _ = batch["tokens"].shape
        assert batch["mask"].shape == (B, S, 33) and B <= 4 and B * S <= 200
        assert batch["lengths"].max() == S and len(batch["ids"]) == B
        ids += batch["ids"]
    assert sorted(ids) == sorted(e.id for e in dm.train_set.examples)
    val_ids = [b["ids"] for b in dm.val_dataloader()]
    assert val_ids == [b["ids"] for b in dm.val_dataloader()]  # deterministic
    assert sorted(i for b in val_ids for i in b) == ["ex0", "ex16", "ex24", "ex32", "ex8"]


def _seen(batch: dict) -> list:
    """What a step trains on: ids, rows of each example (context included), the scored rows."""
    return [batch["ids"], batch["lengths"].tolist(), batch["target"].sum(1).tolist()]


@pytest.mark.parametrize("context", [None, {"p": 0.5, "max_segments": 2}])
def test_datamodule_state_resumes_the_sampler(fake_prepare: list[dict], context: dict | None) -> None:
    dm = _dm(context=context)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    full = [_seen(b) for b in loader]
    it = iter(loader)
    head = [_seen(next(it)) for _ in range(3)]
    state = dm.state_dict()
    assert state["epoch"] == 1 and state["batches_yielded"] == 3

    dm2 = _dm(context=context)
    dm2.load_state_dict(state)  # Lightning restores the datamodule before building dataloaders
    dm2.setup("fit")
    assert head + [_seen(b) for b in dm2.train_dataloader()] == full
    with_context = sum(n > t for b in full for n, t in zip(b[1], b[2], strict=True))
    assert (with_context > 0) == (context is not None)
    assert all(len(b[0]) * max(b[1]) <= 200 for b in full)  # the budget counts context rows


def test_context_that_cannot_fit_fails_in_prepare_data(fake_prepare: list[dict]) -> None:
    from elise.data.context import ContextError

    with pytest.raises(ContextError, match="data.context.p"):
        _dm(context={"p": 2.0})  # a bad setting: at construction, before any data is read
    dm = _dm(context={"p": 0.5, "max_rows": 10})
    with pytest.raises(ContextError, match=r"data\.context\.max_rows=10 is too small"):
        dm.prepare_data()  # train.py calls it before building the model


def test_speaker_map_and_empty_val_split_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [e for e in _examples(tmp_path) if e.split == "train"]
    report = {
        "kept": len(examples),
        "speakers": {"alice": 0, "bob": 1},
        "speaker_clips": {"alice": 3, "bob": 2},
    }

    def prepare(data_cfg, codec, tokenizer, strict=False, **kwargs):
        return PreparedData(list(examples), report, tmp_path)

    monkeypatch.setitem(sys.modules, "elise.data.prepare", types.SimpleNamespace(prepare=prepare))
    import elise.codec

    monkeypatch.setattr(elise.codec, "build_codec", lambda **kw: None, raising=False)
    dm = _dm(val_fraction=0.0)
    assert dm.speakers == {}
    dm.prepare_data()
    assert dm.speakers == {"alice": 0, "bob": 1}
    with pytest.warns(UserWarning, match=r"no validation clips .*data\.val_fraction=.*data\.val_count="):
        dm.setup("fit")
    assert dm.val_dataloader() == []  # Lightning skips validation instead of a zero-length loader


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(_seen(batch))
        return (self.w * batch["tokens"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, ckpt_path: str | None = None, callbacks=(), context: dict | None = None) -> list:
    model = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
        use_distributed_sampler=False, default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    # a worker process: the sampler runs ahead of training (prefetch), the saved position must not
    trainer.fit(model, datamodule=_dm(num_workers=1, context=context), ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("context", [None, {"p": 0.5}])
def test_lightning_sets_epoch_and_resumes_exactly_from_a_mid_epoch_checkpoint(
    fake_prepare: list[dict], tmp_path: Path, context: dict | None
) -> None:
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    full = _fit(tmp_path, callbacks=[ckpt], context=context)
    n = len(full) // 2
    assert full[:n] != full[n:]  # Lightning called set_epoch: epoch 1 is ordered differently
    path = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    state = torch.load(path, weights_only=False)["EliseDataModule"]
    assert state["epoch"] == 0 and state["batches_yielded"] == 4
    assert _fit(tmp_path, ckpt_path=str(path), context=context) == full[4:]


@pytest.mark.slow  # a 2-step training run; the warning itself is tested above
def test_training_without_a_val_split_warns_once_and_trains(fast_overrides, tmp_path: Path) -> None:
    from elise.config import compose
    from elise.train import train

    overrides = [*fast_overrides, "data.val_count=0", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]
    cfg = compose("train", overrides, return_hydra_config=True)
    with pytest.warns(UserWarning, match=r"no validation clips \(16 train\).*data\.val_count=") as caught:
        train(cfg)
    assert sum("no validation clips" in str(w.message) for w in caught) == 1
    assert list(tmp_path.rglob("*.ckpt"))
