"""Model, loss and generation core: shapes, counts, the loss layout and cached == uncached."""

from __future__ import annotations

import json
import math

import pytest
import torch

from elise.generate import SamplingConfig, generate, left_pad, sample_logits
from elise.layout import AUDIO_VOCAB, CODEBOOK_SIZE, NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model import build_model
from elise.model.blocks import rope_inv_freq
from elise.model.loss import csm_loss, select_decoder_frames


def tiny_model(seed: int = 0, heads: bool = True):
    torch.manual_seed(seed)
    model = build_model("tiny").eval()
    if heads:  # random heads so logits are not all zero (from-scratch init zeroes them)
        torch.nn.init.normal_(model.codebook0_head.weight, std=0.5)
        torch.nn.init.normal_(model.audio_head, std=0.5)
    return model


def random_batch(seed: int = 0, frames=(9, 5), text=(7, 4)):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for f, t in zip(frames, text, strict=True):
        codes = torch.randint(1, CODEBOOK_SIZE, (NUM_CODEBOOKS, f), generator=g)
        text_ids = torch.randint(3, 259, (t,), generator=g).tolist()
        rows.append(segment_rows(text_ids, codes))
    return pad_rows(rows)


@pytest.mark.parametrize(
    "preset,backbone,decoder,total",
    [("marvis_250m", 261.9, 60.8, 568.9), ("csm_1b", 973.1, 111.2, 1552.8)],
)
def test_preset_parameter_counts(preset, backbone, decoder, total, capsys):
    """The table `python -m elise.model model=<preset>` prints (in-process: test_cli runs the command)."""
    from elise.config import compose
    from elise.model.__main__ import main

    main(compose("model_info", [f"model={preset}"]))
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["backbone_blocks"] / 1e6 == pytest.approx(backbone, abs=0.05)
    assert counts["decoder_blocks"] / 1e6 == pytest.approx(decoder, abs=0.05)
    assert counts["total"] / 1e6 == pytest.approx(total, abs=0.05)


def test_config_counts_match_modules():
    for name in ("tiny", "marvis_250m"):
        with torch.device("meta"):
            m = build_model(name)
        assert m.cfg.backbone.num_block_params() == m.num_params()["backbone_blocks"]
        assert m.cfg.decoder.num_block_params() == m.num_params()["decoder_blocks"]


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        hidden_size=1536,
        num_attention_heads=12,
        head_dim=128,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling},
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inv_freq(128, 500000.0, None))  # scaling changes low frequencies


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    model = build_model("tiny")
    tokens, mask = random_batch()
    out = csm_loss(model, tokens, mask, decoder_fraction=1.0)
    assert out.backbone_loss.item() == pytest.approx(math.log(AUDIO_VOCAB), abs=1e-5)
    assert out.decoder_loss.item() == pytest.approx(math.log(AUDIO_VOCAB), abs=1e-5)
    assert out.per_codebook_loss.shape == (32,)
    # targets: every audio row incl. the EOS row of each item (9 + 1 and 5 + 1 frames)
    assert out.num_frames == 16


def test_loss_targets_are_next_row_codebooks():
    """The hidden state of row t is scored against row t+1: swapping in a model whose head reads
    the answer off the current row must fail, one that is scored correctly must not."""
    model = tiny_model()
    tokens, mask = random_batch()
    out = csm_loss(model, tokens, mask, decoder_fraction=1.0)
    frames = []
    for b in range(2):
        rows = torch.nonzero(mask[b, 1:, :32].any(-1)).flatten() + 1
        frames.append(tokens[b, rows, 0])
    torch.testing.assert_close(out.target0, torch.cat(frames))
    assert out.targets.shape == (16, 31)


def test_mask_matters():
    """Masked columns must not contribute: changing a masked token leaves the loss unchanged."""
    model = tiny_model()
    tokens, mask = random_batch()
    ref = csm_loss(model, tokens, mask, decoder_fraction=1.0).loss
    t2 = tokens.clone()
    t2[..., 32] = torch.where(mask[..., 32], t2[..., 32], 123)  # text column of audio rows
    t2[..., :32] = torch.where(mask[..., :32], t2[..., :32], 77)  # code columns of text/pad rows
    torch.testing.assert_close(csm_loss(model, t2, mask, decoder_fraction=1.0).loss, ref)


def test_decoder_fraction_is_seeded_and_sized():
    model = tiny_model()
    tokens, mask = random_batch(frames=(40, 30), text=(5, 5))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = csm_loss(model, tokens, mask, decoder_fraction=0.2, generator=g())
    b = csm_loss(model, tokens, mask, decoder_fraction=0.2, generator=g())
    assert a.num_decoder_frames == 15  # ceil(0.2 * 72 = 14.4), as documented (not round: 14)
    torch.testing.assert_close(a.loss, b.loss)
    c = csm_loss(model, tokens, mask, decoder_fraction=0.2, generator=torch.Generator().manual_seed(4))
    assert c.loss != a.loss


def test_select_decoder_frames_takes_the_ceiling():
    sizes = [select_decoder_frames(n, f, None, "cpu").numel() for n, f in ((10, 0.25), (30, 0.1), (3, 0.01))]
    assert sizes == [3, 3, 1]  # ceil(2.5), ceil(3.0000000000000004 -> 3), at least one


def test_padding_does_not_change_items():
    model = tiny_model()
    tokens, mask = random_batch()
    h = model.backbone_hidden(tokens, mask)
    h0 = model.backbone_hidden(tokens[1:, : 4 + 5 + 1], mask[1:, : 4 + 5 + 1])
    torch.testing.assert_close(h[1:, :10], h0, atol=1e-5, rtol=1e-5)


def test_sampling_never_emits_spare_ids():
    logits = torch.full((4, AUDIO_VOCAB), -10.0)
    logits[:, CODEBOOK_SIZE:] = 100.0  # the spare ids are by far the most likely
    g = torch.Generator().manual_seed(0)
    for cfg in (SamplingConfig(1.0, 1), SamplingConfig(1.0, 50), SamplingConfig(5.0, 0)):
        ids = sample_logits(logits, cfg, g)
        assert int(ids.max()) < CODEBOOK_SIZE


def test_top_k_restricts_support():
    logits = torch.arange(AUDIO_VOCAB, dtype=torch.float32).repeat(64, 1)
    ids = sample_logits(logits, SamplingConfig(100.0, 3), torch.Generator().manual_seed(0))
    assert set(ids.tolist()) <= {2045, 2046, 2047}


def prompt(seed: int, n_text: int, n_frames: int):
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(3, 259, (n_text,), generator=g).tolist()
    codes = torch.randint(1, CODEBOOK_SIZE, (NUM_CODEBOOKS, n_frames), generator=g)
    return segment_rows(text_ids, codes, eos=False)


def teacher_forced_greedy(model, tokens, mask, codes):
    """Uncached: run prompt + generated frames through the full forward; argmax at every step."""
    from elise.layout import audio_rows

    a_t, a_m = audio_rows(codes)
    t = torch.cat([tokens, a_t[:-1]])[None]
    m = torch.cat([mask, a_m[:-1]])[None]
    h = model.backbone_hidden(t, m)[0, tokens.shape[0] - 1 :]  # [F, Db] states that predict each frame
    c0 = model.codebook0_head(h)[:, :CODEBOOK_SIZE].argmax(-1)
    logits = model.decoder_logits(h, codes.t())[..., :CODEBOOK_SIZE].argmax(-1)  # [F, 31]
    return torch.cat([c0[:, None], logits], 1).t()


def test_cached_generation_equals_uncached_forward():
    model = tiny_model(seed=1)
    tokens, mask = prompt(0, 6, 3)
    with torch.no_grad():
        codes, lengths = generate(
            model, tokens[None], mask[None], 10, SamplingConfig(1.0, 1), stop_on_eos=False
        )
        assert codes.shape == (1, 32, 10) and lengths.tolist() == [10]
        ref = teacher_forced_greedy(model, tokens, mask, codes[0])
    torch.testing.assert_close(codes[0], ref)


def test_batched_left_padded_generation_equals_one_by_one():
    model = tiny_model(seed=2)
    prompts = [prompt(1, 5, 2), prompt(2, 9, 4)]
    with torch.no_grad():
        tokens, mask, pads = left_pad(prompts)
        batch, _ = generate(model, tokens, mask, 6, SamplingConfig(1.0, 1), pads=pads, stop_on_eos=False)
        for i, (t, m) in enumerate(prompts):
            one, _ = generate(model, t[None], m[None], 6, SamplingConfig(1.0, 1), stop_on_eos=False)
            torch.testing.assert_close(batch[i], one[0])


def test_generation_stops_on_eos_frame():
    model = tiny_model(seed=3)
    with torch.no_grad():  # zero final norms -> all logits equal -> greedy picks code 0 -> the EOS frame
        model.backbone.norm.weight.zero_()
        model.decoder.norm.weight.zero_()
    tokens, mask = prompt(0, 4, 1)
    codes, lengths = generate(model, tokens[None], mask[None], 50, SamplingConfig(1.0, 1))
    assert codes.shape == (1, 32, 1) and lengths.tolist() == [0]
    assert int(codes.abs().sum()) == 0
    codes, lengths = generate(model, tokens[None], mask[None], 7, SamplingConfig(1.0, 1), stop_on_eos=False)
    assert codes.shape == (1, 32, 7) and lengths.tolist() == [7]


def test_seeded_sampling_is_deterministic():
    model = tiny_model(seed=4)
    tokens, mask = prompt(0, 4, 2)
    run = lambda s: generate(  # noqa: E731
        model,
        tokens[None],
        mask[None],
        5,
        SamplingConfig(0.9, 50),
        torch.Generator().manual_seed(s),
        stop_on_eos=False,
    )[0]
    torch.testing.assert_close(run(7), run(7))
    assert not torch.equal(run(7), run(8))
