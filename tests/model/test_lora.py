"""LoRA adapters: parameter count, frozen base, merged == unmerged, fast paths after merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elise.generate import SamplingConfig, generate
from elise.layout import NUM_CODEBOOKS, segment_rows
from elise.model import build_model
from elise.model.lora import LoRAConfig, LoRALinear, add_lora, lora_state_dict, merge_lora, num_lora_params
from elise.model.quant import quantize_int8


def base_model(seed: int = 0, head_std: float = 1.0):
    """The tiny model with random heads (zero-initialised heads make every greedy code 0; std 1.0
    separates the argmaxes, 0.1 gives logits of a trained model's size, |logit| < 5)."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        model.codebook0_head.weight.normal_(std=head_std)
        model.audio_head.normal_(std=head_std)
    return model.eval()


def adapted(cfg: LoRAConfig, seed: int = 0, head_std: float = 1.0):
    """``base_model`` with adapters whose B is random (a zero B changes nothing to compare)."""
    model = add_lora(base_model(seed, head_std), cfg)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(std=0.05)
    return model.eval()


def rows(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2048, (NUM_CODEBOOKS, 7), generator=g)
    tokens, mask = segment_rows(list(range(5, 20)), codes)
    return tokens[None], mask[None]


def logits(model, tokens, mask):
    with torch.no_grad():
        h = model.backbone_hidden(tokens, mask)  # [1, S, Db]
        dec = model.decoder_logits(h[0, :-1], tokens[0, 1:, :NUM_CODEBOOKS])  # [S-1, 31, V]
        return model.codebook0_head(h), dec


@pytest.mark.parametrize(
    "targets", [("backbone.attn", "backbone.mlp", "decoder.attn", "decoder.mlp"), ("decoder.q_proj",)]
)
def test_rank_r_adds_r_times_in_plus_out_per_projection_and_freezes_the_rest(targets):
    model = build_model("tiny")
    base = sum(p.numel() for p in model.parameters())
    cfg = LoRAConfig(rank=3, alpha=6, targets=targets)
    add_lora(model, cfg)
    b, d = model.cfg.backbone, model.cfg.decoder
    if len(targets) == 1:  # q_proj of each decoder layer: d.dim in, heads * head_dim out
        expected = d.num_layers * 3 * (d.dim + d.num_heads * d.head_dim)
    else:
        expected = 0
        for t in (b, d):
            q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
            per_layer = (t.dim + q) * 2 + (t.dim + kv) * 2 + (t.dim + t.mlp_hidden) * 3
            expected += t.num_layers * 3 * per_layer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == num_lora_params(build_model("tiny"), cfg)
    assert sum(p.numel() for p in model.parameters()) == base + expected
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == len(lora_state_dict(model)) // 2
    assert "backbone.layers.0.self_attn.q_proj.weight" in model.state_dict()  # base names unchanged


def test_untrained_adapters_change_nothing():
    torch.manual_seed(0)
    plain = build_model("tiny").eval()
    model = add_lora(build_model("tiny"), LoRAConfig(rank=4)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    tokens, mask = rows()
    for a, b in zip(logits(plain, tokens, mask), logits(model, tokens, mask), strict=True):
        assert torch.equal(a, b)


def test_merged_logits_equal_unmerged_within_1e_5():
    model = adapted(LoRAConfig(rank=4, alpha=8, dropout=0.1), head_std=0.1)
    tokens, mask = rows()
    before = logits(model, tokens, mask)
    assert 1.0 < max(t.abs().max() for t in before) < 5.0
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.backbone.layers[0].self_attn.q_proj) is nn.Linear
    after = logits(model, tokens, mask)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() < 1e-5
    assert set(model.state_dict()) == set(base)  # a plain model again
    changed = [k for k in base if not torch.equal(model.state_dict()[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)


def test_fused_and_int8_paths_after_merging_keep_the_adaptation():
    """fuse/quantize read the projections' weights only: after merge_lora they carry the adapters."""
    model = adapted(LoRAConfig(rank=4, alpha=8))
    tokens, mask = segment_rows(list(range(5, 20)), None, eos=False)
    sampling = SamplingConfig(1.0, 1)
    with torch.no_grad():
        ref, _ = generate(model, tokens[None], mask[None], 6, sampling, stop_on_eos=False)
        merge_lora(model)
        fused, _ = generate(model.fuse(), tokens[None], mask[None], 6, sampling, stop_on_eos=False)
        base, _ = generate(base_model(0), tokens[None], mask[None], 6, sampling, stop_on_eos=False)
    assert torch.equal(fused, ref) and not torch.equal(base, ref)
    with torch.no_grad():
        h = model.backbone_hidden(tokens[None], mask[None])[:, -1]  # [1, Db]
        exact = model.codebook0_logits(h)
        quantize_int8(model)
        assert (model.codebook0_logits(h) - exact).abs().max() < 0.05 * exact.abs().max()


def test_bad_settings_are_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match="backbone\\|decoder"):
        LoRAConfig(targets=("encoder.attn",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)
    model = add_lora(build_model("tiny"), LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, LoRAConfig(rank=2))
