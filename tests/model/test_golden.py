"""Golden numerics of a seeded tiny elise model: any change to init, layout, blocks, loss or
sampling shows up here. Regenerate deliberately with ``ELISE_UPDATE_GOLDEN=1 pytest tests/model/test_golden.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from elise.generate import SamplingConfig, generate
from elise.layout import NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model import build_model
from elise.model.loss import csm_loss
from elise.text import ByteTokenizer, encode_prompt

GOLDEN = Path(__file__).parents[1] / "assets" / "golden_tiny.json"


def compute() -> dict:
    torch.manual_seed(1234)
    model = build_model("tiny").eval()
    with torch.no_grad():  # from-scratch heads are zero: give them seeded values to exercise them
        model.codebook0_head.weight.normal_(std=0.3)
        model.audio_head.normal_(std=0.3)
    g = torch.Generator().manual_seed(5)
    tok = ByteTokenizer()
    rows = [
        segment_rows(
            encode_prompt(tok, "Hello there.", 0), torch.randint(0, 2048, (NUM_CODEBOOKS, 7), generator=g)
        ),
        segment_rows(
            encode_prompt(tok, "Hi <laughs>", 1), torch.randint(0, 2048, (NUM_CODEBOOKS, 4), generator=g)
        ),
    ]
    tokens, mask = pad_rows(rows)
    with torch.no_grad():
        out = csm_loss(model, tokens, mask, decoder_fraction=0.5, generator=torch.Generator().manual_seed(0))
        h = model.backbone_hidden(tokens, mask)
        prompt_t, prompt_m = segment_rows(encode_prompt(tok, "Golden.", 0), None, eos=False)
        greedy, _ = generate(
            model, prompt_t[None], prompt_m[None], 4, SamplingConfig(1.0, 1), stop_on_eos=False
        )
        sampled, _ = generate(
            model,
            prompt_t[None],
            prompt_m[None],
            3,
            SamplingConfig(0.8, 20),
            torch.Generator().manual_seed(9),
            stop_on_eos=False,
        )
    return {
        "loss": out.loss.item(),
        "backbone_loss": out.backbone_loss.item(),
        "decoder_loss": out.decoder_loss.item(),
        "per_codebook_loss": [round(x, 6) for x in out.per_codebook_loss.tolist()],
        "hidden_sum": h.sum().item(),
        "hidden_first": [round(x, 6) for x in h[0, 0, :8].tolist()],
        "greedy_codes": greedy[0].tolist(),
        "sampled_codes": sampled[0].tolist(),
    }


def test_golden_tiny_model():
    got = compute()
    if os.environ.get("ELISE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1))
    expected = json.loads(GOLDEN.read_text())
    for key in ("loss", "backbone_loss", "decoder_loss", "hidden_sum"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-4), key
    assert got["per_codebook_loss"] == pytest.approx(expected["per_codebook_loss"], rel=1e-4, abs=1e-4)
    assert got["hidden_first"] == pytest.approx(expected["hidden_first"], rel=1e-4, abs=1e-5)
    assert got["greedy_codes"] == expected["greedy_codes"]
    assert got["sampled_codes"] == expected["sampled_codes"]
