"""Int8 / int4 inference: the synthesis path really runs the int8 and int4 kernels (heads included, no
weight dequantized for long inputs); on a trained demo-sized model int8 logits stay close to fp32 and
give the same teacher-forced argmax, int4's are further off, and the kernel choice (``quantize=auto``)
rejects int4 there by its agreement check and keeps int8."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elise.generate import FrameGenerator, SamplingConfig, generate
from elise.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model import build_model, kernels
from elise.model.kernels import CANDIDATES, ROWS, choose_kernels, machine_key
from elise.model.loss import csm_loss
from elise.model.quant import Int8Matmul, quantize
from elise.synthesis.runtime import prepare_model

GREEDY = SamplingConfig(1.0, 1)
# measured (relative error of each logit vector, mean / worst; argmax agreement):
# int8: prefill of 8 rows 0.00374 / 0.0389, 99.83 % over 37 frames; prefill of 20 rows (int8 x int8)
# 0.00373 / 0.0457, 99.63 %. int4 (groups of 32), prefill of 20 rows: 0.0346 / 0.477, 98.75 %
BOUNDS = {"int8": (0.005, 0.06, 0.99), "int4": (0.045, 0.6, 0.98)}  # mean, worst, argmax agreement


class CountInt8(TorchDispatchMode):
    """Counts int8 kernel calls: ``_weight_int8pack_mm`` by weight shape, and ``_int_mm``."""

    def __init__(self) -> None:
        super().__init__()
        self.pack: Counter[tuple[int, ...]] = Counter()
        self.int_mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._weight_int8pack_mm.default:
            self.pack[tuple(args[1].shape)] += 1
        elif func is torch.ops.aten._int_mm.default:
            self.int_mm += 1
        return func(*args, **(kwargs or {}))


def item(seed: int, n_text: int, n_frames: int):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 259, (n_text,), generator=g).tolist()
    return segment_rows(text, torch.randint(0, CODEBOOK_SIZE, (NUM_CODEBOOKS, n_frames), generator=g))


def fit_demo():
    """The demo preset fitted to one short clip (logits as peaked as a trained model's on its data),
    and that clip's rows: 6 text rows, 40 frames, the EOS frame."""
    torch.manual_seed(0)
    model = build_model("demo")
    tokens, mask = pad_rows([item(0, 5, 40)])
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(12):
        loss = csm_loss(model, tokens, mask, decoder_fraction=1.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), tokens[0], mask[0]


@pytest.fixture(scope="module")
def trained():
    return fit_demo()


@torch.no_grad()
def frame_logits(model, tokens, mask, prompt_rows: int):
    """Logits [F, 32, V] of every code of the frames after ``prompt_rows``, teacher-forced (the true
    codes are fed back, within a frame and across frames) through the generation steps."""
    codes = tokens[prompt_rows:-1, :NUM_CODEBOOKS]  # [F, 32] (the last row is the EOS frame)
    gen = FrameGenerator(model, 1, tokens.shape[0], GREEDY)
    gen.prefill(tokens[None, :prompt_rows], mask[None, :prompt_rows])
    frames = []
    for c in codes[:, None]:  # [1, 32]
        h, cache = gen.hidden, gen.decoder_cache
        logits = [model.codebook0_logits(h)]
        cache.reset()
        out = model.decoder(model.project(torch.stack([h, model.audio_embeddings(c[:, 0])], 1)), cache=cache)
        for k in range(1, NUM_CODEBOOKS):
            logits.append(model.codebook_logits(out[:, -1], k))
            if k < NUM_CODEBOOKS - 1:
                out = model.decoder(
                    model.project(model.embed_codes(c[:, k : k + 1], slice(k, k + 1))), cache=cache
                )
        frames.append(torch.stack(logits, 1)[0])  # [32, V]
        gen.advance(c)
    return torch.stack(frames)  # [F, 32, V]


# int8 prefill by int8 x int8 (20 rows) / by the matrix-vector kernel (8 rows; 37 frames, ~55 s: slow)
@pytest.mark.parametrize(
    "mode, prompt_rows", [("int8", 20), ("int4", 20), pytest.param("int8", 8, marks=pytest.mark.slow)]
)
def test_quantized_logits_close_to_fp32_on_a_trained_model(trained, mode, prompt_rows):
    model, tokens, mask = trained
    ref = frame_logits(model, tokens, mask, prompt_rows)[..., :CODEBOOK_SIZE]  # [F, 32, 2048]
    got = frame_logits(quantize(copy.deepcopy(model), mode), tokens, mask, prompt_rows)[..., :CODEBOOK_SIZE]
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # [F, 32] relative error of each logit vector
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    mean_bound, worst_bound, agree_bound = BOUNDS[mode]
    assert 0 < float(rel.mean()) < mean_bound and float(rel.max()) < worst_bound
    assert agree >= agree_bound


def test_auto_rejects_int4_and_keeps_int8_on_a_trained_model(trained, tmp_path):
    """With int4 timed fastest, then int8: int4 fails the agreement check on the demo model, int8 passes."""
    model, _, _ = trained
    model = prepare_model(copy.deepcopy(model), torch.float32)
    cache = tmp_path / "kernels.json"
    order = ("int4", "int8", "bf16", "fp32")
    timings = {c: {name: 1e-3 * (order.index(c) + 1) for name in ROWS} for c in CANDIDATES}
    key = machine_key(model, torch.device("cpu")) + "|" + ",".join(CANDIDATES)
    cache.write_text(json.dumps({key: {"timings": timings, "date": "test"}}))
    choice = choose_kernels(model, cache=cache)
    assert choice.mode == "int8" and isinstance(model.fast["codebook0_head"], Int8Matmul)
    assert choice.errors["int4"] > kernels.MAX_REL_ERROR > choice.errors["int8"] > 0


def test_int8_synthesis_runs_the_int8_kernels():
    torch.manual_seed(0)
    model = prepare_model(build_model("tiny"), torch.float32, quantize="int8")
    cfg = model.cfg
    tokens, mask = item(1, 9, 10)  # 10 text rows + 10 frames: a 20-row prompt
    frames = 2
    with torch.no_grad(), CountInt8() as count:
        generate(model, tokens[None, :20], mask[None, :20], frames, GREEDY, stop_on_eos=False)
    v, db, dd = cfg.audio_vocab_size, cfg.backbone.dim, cfg.decoder.dim
    assert count.int_mm == 4 * cfg.backbone.num_layers  # the 20-row prefill: int8 x int8, not dequantized
    assert count.pack[(v, dd)] == (NUM_CODEBOOKS - 1) * frames  # the 31 int8 decoder heads
    assert count.pack[(v, db)] == frames  # the codebook-0 head
    per_step = 4  # qkv, o, gate_up, down
    backbone = per_step * cfg.backbone.num_layers * (frames - 1)  # advance() after every frame but the last
    decoder = per_step * cfg.decoder.num_layers * (NUM_CODEBOOKS - 1) * frames
    assert (
        sum(count.pack.values()) == backbone + decoder + NUM_CODEBOOKS * frames + (NUM_CODEBOOKS - 1) * frames
    )


class CountInt4(TorchDispatchMode):
    """Counts ``_weight_int4pack_mm_for_cpu`` calls by packed weight rows (the padded output channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._weight_int4pack_mm_for_cpu.default:
            self.rows[int(args[1].shape[0])] += 1
        return func(*args, **(kwargs or {}))


def test_int4_synthesis_runs_the_int4_kernels():
    torch.manual_seed(0)
    model = prepare_model(build_model("tiny"), torch.float32, quantize="int4")
    cfg = model.cfg
    tokens, mask = item(1, 9, 10)
    frames = 2
    with torch.no_grad(), CountInt4() as count:
        codes, _ = generate(model, tokens[None, :20], mask[None, :20], frames, GREEDY, stop_on_eos=False)
    assert codes.shape == (1, NUM_CODEBOOKS, frames)
    heads = -(-cfg.audio_vocab_size // 16) * 16  # 2051 output channels padded to 2064
    assert count.rows[heads] == NUM_CODEBOOKS * frames  # codebook-0 head + 31 decoder heads per frame
    backbone = 4 * cfg.backbone.num_layers * frames  # the prefill, then advance() after frame 1
    decoder = 4 * cfg.decoder.num_layers * (NUM_CODEBOOKS - 1) * frames
    projection = (NUM_CODEBOOKS - 1) * frames
    assert sum(count.rows.values()) == backbone + decoder + projection + NUM_CODEBOOKS * frames
