"""Training on context segments (data.context): layout equal to synthesis's voice prompt, loss on the
target only, a seeded per-epoch plan within the row budget, batches that count the context rows
(DDP, exact resume), and one-line errors for settings that cannot work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elise.config import compose
from elise.data.collate import collate
from elise.data.context import ContextBatchSampler, ContextError, ContextPlanner, ContextSettings
from elise.data.dataset import CodesDataset
from elise.data.items import Example
from elise.layout import NUM_CODEBOOKS, audio_rows, eos_codes, is_audio_row
from elise.model import build_model
from elise.model.loss import csm_loss
from elise.synthesis.prompt import Segment, build_prompt
from elise.text import build_tokenizer, encode_prompt

TEXTS = ["Hello there.", "A second clip, a bit longer.", "Third.", "And the fourth one here."]


def _examples(
    root: Path, n: int = 60, speakers: int = 3, groups: int | None = None, seed: int = 0
) -> list[Example]:
    tok = build_tokenizer("bytes")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames, speaker = int(rng.integers(3, 40)), i % speakers
        path = root / f"c{i}.npy"
        np.save(path, rng.integers(1, 2048, (NUM_CODEBOOKS, frames)).astype(np.int16))
        text = TEXTS[i % len(TEXTS)]
        group = None if groups is None else f"g{i % groups}"
        out.append(
            Example(f"c{i}", text, speaker, encode_prompt(tok, text, speaker), str(path), frames, group=group)
        )
    return out


# ---- layout: the rows synthesis builds for a voice prompt -------------------------------------


def test_context_example_rows_are_the_synthesis_voice_prompt_plus_target_audio(tmp_path: Path) -> None:
    tok = build_tokenizer("bytes")
    ex = _examples(tmp_path, n=8, speakers=1)
    ds = CodesDataset(ex)
    batch = collate([ds[(5, (2, 7))], ds[3]])
    ref = [Segment(ex[j].text, ex[j].speaker, ex[j].load_codes()) for j in (2, 7)]
    prompt_tokens, prompt_mask = build_prompt(tok, ex[5].text, ex[5].speaker, ref)  # what synthesis feeds
    audio_t, audio_m = audio_rows(torch.cat([ex[5].load_codes(), eos_codes()], dim=1))  # target audio + EOS
    want_t, want_m = torch.cat([prompt_tokens, audio_t]), torch.cat([prompt_mask, audio_m])
    n = want_t.shape[0]
    assert batch["lengths"].tolist() == [n, ex[3].num_rows]
    assert torch.equal(batch["tokens"][0, :n], want_t) and torch.equal(batch["mask"][0, :n], want_m)
    # the loss counts the target segment only: its text rows, audio rows and EOS row
    ctx = ex[2].num_rows + ex[7].num_rows
    assert batch["target"][0].tolist() == [False] * ctx + [True] * ex[5].num_rows + [False] * (
        batch["tokens"].shape[1] - n
    )
    assert batch["target"][1, : ex[3].num_rows].all() and not batch["target"][1, ex[3].num_rows :].any()
    every = collate([ds[(5, (2, 7))]], loss_on="all")
    assert every["target"][0].all() and torch.equal(every["tokens"][0], want_t)


# ---- loss masking -----------------------------------------------------------------------------


def test_loss_counts_only_target_rows_and_equals_the_manual_masked_mean(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    torch.nn.init.normal_(model.codebook0_head.weight, std=0.5)
    torch.nn.init.normal_(model.audio_head, std=0.5)
    ex = _examples(tmp_path, n=8, speakers=1)
    ds = CodesDataset(ex)
    batch = collate([ds[(5, (2,))], ds[(1, (4, 6))], ds[3]])
    tokens, mask, target = batch["tokens"], batch["mask"], batch["target"]
    with torch.no_grad():
        out = csm_loss(model, tokens, mask, decoder_fraction=1.0, target=target)
        full = csm_loss(model, tokens, mask, decoder_fraction=1.0)
        rows = is_audio_row(mask[:, 1:]) & target[:, 1:]  # [B, S-1] predicted rows of the targets
        h = model.backbone_hidden(tokens, mask)[:, :-1][rows]  # [N, D]
        frames = tokens[:, 1:][rows][:, :NUM_CODEBOOKS]  # [N, 32]
        backbone = F.cross_entropy(model.codebook0_head(h).float(), frames[:, 0])
        logits = model.decoder_logits_by_codebook(h, frames).float()  # [31, N, V]
        decoder = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), frames[:, 1:].t().reshape(-1))
    # predicted rows: each target's audio rows + its EOS row, nothing of the context segments
    assert out.num_frames == sum(ex[i].frames + 1 for i in (5, 1, 3)) == int(rows.sum())
    assert full.num_frames == out.num_frames + sum(ex[j].frames + 1 for j in (2, 4, 6))
    assert torch.allclose(out.backbone_loss, backbone, atol=1e-6)
    assert torch.allclose(out.decoder_loss, decoder, atol=1e-6)
    assert not torch.allclose(out.loss, full.loss)
    every = collate([ds[(5, (2,))], ds[(1, (4, 6))], ds[3]], loss_on="all")
    with torch.no_grad():
        assert torch.equal(csm_loss(model, tokens, mask, 1.0, target=every["target"]).loss, full.loss)


# ---- the plan ---------------------------------------------------------------------------------


def test_planner_is_seeded_per_epoch_same_speaker_and_group_within_budget(tmp_path: Path) -> None:
    ex = _examples(tmp_path, n=300, speakers=3, groups=5)
    s = ContextSettings(p=0.5, max_segments=3, max_rows=150)
    planner = ContextPlanner(ex, s, seed=7)
    plan = planner.plan(0)
    assert plan == ContextPlanner(ex, s, seed=7).plan(0)  # every rank / a resumed run: the same plan
    assert plan != planner.plan(1) and plan != ContextPlanner(ex, s, seed=8).plan(0)
    with_ctx = [i for i, c in enumerate(plan) if c]
    assert 0.4 < len(with_ctx) / len(ex) < 0.6  # p=0.5 (156 of 300 with this seed)
    assert {len(plan[i]) for i in with_ctx} == {1, 2, 3}
    rows = planner.rows(plan)
    for i in with_ctx:
        c = plan[i]
        assert i not in c and len(set(c)) == len(c)
        assert all(ex[j].speaker == ex[i].speaker and ex[j].group == ex[i].group for j in c)
        assert rows[i] == ex[i].num_rows + sum(ex[j].num_rows for j in c) <= 150
    assert all(not c for c in ContextPlanner(ex, ContextSettings(p=0.0), seed=7).plan(0))


def test_sampler_counts_context_rows_and_resumes_exactly_on_every_rank(tmp_path: Path) -> None:
    ex = _examples(tmp_path, n=200)
    lengths = [e.num_rows for e in ex]
    planner = ContextPlanner(ex, ContextSettings(p=0.5, max_segments=2, max_rows=200), seed=3)

    def sampler(rank: int = 0, replicas: int = 1) -> ContextBatchSampler:
        return ContextBatchSampler(
            lengths, planner, max_tokens=400, max_samples=8, seed=3, num_replicas=replicas, rank=rank
        )

    for epoch in range(3):
        ranks = [sampler(r, 2) for r in range(2)]
        for s in ranks:
            s.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert len(batches[0]) == len(batches[1]) == len(ranks[0])  # same count on every rank
        flat = [item for b in batches[0] + batches[1] for item in b]
        assert sorted(i for i, _ in flat) == list(range(len(ex)))  # every item once per epoch
        assert dict(flat) == dict(enumerate(planner.plan(epoch))) or len(batches[0]) * 2 >= len(ex)
        for b in batches[0] + batches[1]:
            rows = [lengths[i] + sum(lengths[j] for j in c) for i, c in b]
            assert len(b) <= 8 and len(b) * max(rows) <= 400  # the budget counts context rows
        assert any(c for _, c in flat)
    one = sampler()
    one.set_epoch(2)
    full = list(one)
    it = iter(one)
    head = [next(it) for _ in range(5)]
    resumed = sampler()
    resumed.load_state_dict(one.state_dict())
    assert head + list(resumed) == full
    assert 0 <= one.padding_fraction(2) < 0.5


# ---- settings that cannot work: one line naming the setting -------------------------------------


def test_context_that_can_never_fit_is_a_one_line_error(tmp_path: Path) -> None:
    ex = _examples(tmp_path, n=20, speakers=2)
    shortest = min(
        sorted(e.num_rows for e in ex if e.speaker == s)[0]
        + sorted(e.num_rows for e in ex if e.speaker == s)[1]
        for s in (0, 1)
    )
    ContextPlanner(ex, ContextSettings(p=0.5, max_rows=shortest), seed=0).check()  # the shortest pair fits
    with pytest.raises(ContextError, match=r"^data\.context\.max_rows=\d+ is too small") as err:
        ContextPlanner(ex, ContextSettings(p=0.5, max_rows=shortest - 1), seed=0).check()
    assert "\n" not in str(err.value)
    ContextPlanner(ex, ContextSettings(p=0.0, max_rows=1), seed=0).check()  # off: nothing to check
    lonely = [Example(e.id, e.text, i, e.text_ids, e.codes_path, e.frames) for i, e in enumerate(ex)]
    with pytest.raises(ContextError, match="needs two training clips of one speaker"):
        ContextPlanner(lonely, ContextSettings(p=0.5), seed=0).check()
    for cfg, setting in [
        ({"p": 1.5}, "data.context.p"),
        ({"max_segments": -1}, "data.context.max_segments"),
        ({"max_segments": 0}, "data.context.max_segments=0"),  # an explicit 0 is checked, not read as unset
        ({"loss_on": "first"}, "data.context.loss_on"),
        ({"max_rows": 9000}, "data.context.max_rows"),
        ({"pp": 0.5}, "unknown data.context"),
    ]:
        with pytest.raises(ContextError, match=setting):
            ContextSettings.from_cfg(cfg, max_tokens=5000)
    assert ContextSettings.from_cfg({"p": 0.5, "max_rows": None}, max_tokens=700).max_rows == 700


def test_context_error_is_a_user_error_of_train() -> None:
    from elise.train import user_error_types

    assert ContextError in user_error_types()


# ---- defaults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, p",
    [([], 0.5), (["experiment=demo"], 0.0), (["experiment=elise_finetune"], 0.5), (["data=ljspeech"], 0.5)],
)
def test_context_is_on_for_the_elise_recipes_only(overrides: list[str], p: float) -> None:
    cfg = compose("train", overrides)  # no experiment: train.yaml's default, the elise recipe
    assert cfg.data.context.p == p and cfg.data.context.loss_on == "last"
    settings = ContextSettings.from_cfg(cfg.data.context, int(cfg.data.max_tokens))
    assert settings.max_segments == 2 and settings.max_rows == cfg.data.max_tokens


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.context.p=0.5", "data.context.max_rows=30"], "data.context.max_rows=30 is too small"),
        (["data.context.loss_on=first"], "data.context.loss_on='first'"),
    ],
    ids=["never_fits", "bad_loss_on"],
)
def test_train_refuses_an_impossible_context_in_one_line(
    fast_overrides, tmp_path, capsys, overrides, expected
):
    from elise.train import main as train_main

    cfg = compose(
        "train", [*fast_overrides, *overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True
    )
    with pytest.raises(SystemExit) as exit_info:
        train_main(cfg)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and expected in err, err


def test_index_backed_planning_uses_the_columns_and_plans_as_the_records_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clip index (data=codes) is planned from its speaker/group columns, never one record per
    clip, with the plan the same clips as ``Example`` records give."""
    import pyarrow as pa

    from elise.data.codes import prepare_codes
    from elise.data.dataset import IndexDataset
    from elise.data.shards import ClipIndex, write_ipc

    rng = np.random.default_rng(1)
    rows = [
        {"id": f"c{i:03d}", "text": TEXTS[i % 4], "speaker": f"s{i % 3}", "group": None if i % 5 == 0 else f"g{i % 4}",
         "codes": rng.integers(0, 2048, (NUM_CODEBOOKS, int(rng.integers(8, 30)))).astype(np.int16).tobytes()}
        for i in range(120)
    ]  # fmt: skip
    (tmp_path / "src").mkdir()
    write_ipc(tmp_path / "src" / "a.arrow", pa.Table.from_pylist(rows))
    data = {
        "source": "codes",
        "path": str(tmp_path / "src"),
        "cache_dir": str(tmp_path / "c"),
        "val_count": 10,
    }
    index = ClipIndex(prepare_codes(data, build_tokenizer("bytes"), progress=False).index)
    train = IndexDataset(index, "train")
    records = list(train.examples)
    s = ContextSettings(p=0.7, max_segments=3, max_rows=200)
    want = ContextPlanner(records, s, seed=5)

    def no_records(*args: object) -> None:
        raise AssertionError("a record was built per clip")

    monkeypatch.setattr(ClipIndex, "clip", no_records)
    got = ContextPlanner(train, s, seed=5)
    got.check()
    for epoch in range(2):
        plan = got.plan(epoch)
        assert plan == want.plan(epoch) and sum(map(bool, plan)) > 50
        for i, c in enumerate(plan):
            key = (records[i].speaker, records[i].group)
            assert all((records[j].speaker, records[j].group) == key for j in c)
    assert got.rows(plan).tolist() == want.rows(plan).tolist()
