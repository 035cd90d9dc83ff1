"""bf16 parity on CPU: elise in bf16 is as far from its fp32 as transformers' CSM in bf16 is from its
fp32, on the same weights (exported through elise.interop), for backbone and depth-decoder logits."""

from __future__ import annotations

import copy

import pytest
import torch

from elise.bench.synth import random_model, transformers_model
from elise.layout import NUM_CODEBOOKS, pad_rows, segment_rows

pytest.importorskip("transformers")

# relative error of bf16 against fp32 logits, measured: elise 0.00496 backbone / 0.00607 decoder,
# transformers 0.00496 / 0.00602
BACKBONE_BOUND, DECODER_BOUND = 0.006, 0.0075


def rows():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 2048, (NUM_CODEBOOKS, 8), generator=g)
    return pad_rows([segment_rows(torch.randint(3, 259, (6,), generator=g).tolist(), codes)])  # 7 + 9 rows


def elise_logits(model, tokens, mask):
    """Codebook-0 logits of every row [S, V] and decoder logits of the 8 frames [8, 31, V], fp32."""
    h = model.backbone_hidden(tokens, mask)[0]  # [S, Db]
    codes = tokens[0, 7:15, :NUM_CODEBOOKS]  # [8, 32]
    return model.codebook0_head(h).float(), model.decoder_logits(h[6:14], codes).float()


def transformers_logits(ref, tokens, mask):
    text = ref.embed_text_tokens(tokens[..., 32])
    audio = ref.backbone_model.embed_tokens(tokens[..., :32])
    emb = torch.where(mask[..., :32].any(-1, keepdim=True), audio, text)  # one segment: no pad rows
    h = ref.backbone_model(inputs_embeds=emb).last_hidden_state[0]  # [S, Db]
    codes = tokens[0, 7:15, :NUM_CODEBOOKS]
    ids = torch.nn.functional.pad(codes[:, :-1], (1, 0))  # decoder input [h, c0..c30]
    dd = ref.depth_decoder(input_ids=ids, backbone_last_hidden_state=h[6:14]).logits
    return ref.lm_head(h).float(), dd.float()


def relative(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


@torch.no_grad()
def test_bf16_error_matches_transformers(tmp_path):
    model = random_model("tiny", seed=0)
    ref = transformers_model(model, str(tmp_path))
    tokens, mask = rows()
    errors = {}
    for name, net, logits in (("elise", model, elise_logits), ("transformers", ref, transformers_logits)):
        fp32 = logits(net, tokens, mask)
        bf16 = logits(copy.deepcopy(net).to(torch.bfloat16), tokens, mask)
        errors[name] = [relative(b, f) for b, f in zip(bf16, fp32, strict=True)]
    (eb, ed), (tb, td) = errors["elise"], errors["transformers"]
    assert eb < BACKBONE_BOUND and ed < DECODER_BOUND
    assert eb <= 1.1 * tb and ed <= 1.1 * td
