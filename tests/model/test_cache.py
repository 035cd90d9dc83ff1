"""The KV cache: causal for a chunk of any length at any cache position (chunked prefill equals the full
forward, with and without left padding), and the static decode step compiles to one graph per shape."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from elise.generate import FrameGenerator, SamplingConfig, left_pad
from elise.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, segment_rows
from elise.model import build_model
from elise.model.blocks import Transformer
from elise.model.presets import preset


def stack(layers: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("test").backbone
    cfg.num_layers = layers
    return Transformer(cfg).eval()


@torch.no_grad()
def test_chunked_prefill_equals_full_forward():
    model = stack()
    x = torch.randn(2, 10, model.cfg.dim, generator=torch.Generator().manual_seed(1))  # [B, 10, D]
    full = model(x)  # uncached, causal
    for chunks in ((4, 3, 3), (1, 6, 3), (10,)):
        cache = model.make_cache(2, 16, torch.float32, "cpu")
        parts, start = [], 0
        for n in chunks:  # a later chunk of several rows must not see its own later rows
            parts.append(model(x[:, start : start + n], cache=cache))
            start += n
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-6, rtol=1e-5)  # measured 4.8e-7
    with pytest.raises(ValueError, match=r"\[B, 1, S, max_len\]"):
        model(x[:, :2], cache=model.make_cache(2, 16, torch.float32, "cpu"), attn_mask=torch.ones(2, 1, 2, 2))


def rows(seed: int, n_text: int, n_frames: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(1, CODEBOOK_SIZE, (NUM_CODEBOOKS, n_frames), generator=g)
    return segment_rows(torch.randint(3, 259, (n_text,), generator=g).tolist(), codes, eos=False)


@torch.no_grad()
def test_chunked_left_padded_prefill_equals_one_shot():
    torch.manual_seed(0)
    model = build_model("test").eval()
    tokens, mask, pads = left_pad([rows(1, 4, 2), rows(2, 7, 5)])  # [2, 12, 33], pads [6, 0]
    one = FrameGenerator(model, 2, 16, SamplingConfig())
    one.prefill(tokens, mask, pads)
    h = model.backbone_hidden(tokens[1:], mask[1:])[0, -1]  # the unpadded item, uncached
    for chunks in ((5, 4, 3), (8, 4)):
        gen, start = FrameGenerator(model, 2, 16, SamplingConfig()), 0
        for n in chunks:
            gen.prefill(tokens[:, start : start + n], mask[:, start : start + n], pads)
            start += n
        torch.testing.assert_close(gen.hidden, one.hidden, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(gen.hidden[1], h, atol=2e-6, rtol=1e-5)


@torch.no_grad()
def test_compiled_decode_step_is_one_graph_without_breaks():
    """16 layers (the per-layer guards of a cache indexed by a Python int hit the recompile limit at 8):
    a decode step of 1 row and one of 2 rows are two graphs, no graph break (fullgraph=True raises on
    one), no recompile across cache positions, results equal to eager. backend=eager: dynamo only."""
    model = stack(layers=16)
    x = torch.randn(1, 7, model.cfg.dim, generator=torch.Generator().manual_seed(2))
    eager_cache = model.make_cache(1, 8, torch.float32, "cpu")
    ref = torch.cat(
        [model(x[:, :2], cache=eager_cache)]
        + [model(x[:, i : i + 1], cache=eager_cache) for i in range(2, 7)],
        1,
    )
    torch._dynamo.reset()
    counters.clear()
    model.compile_step(backend="eager")
    cache = model.make_cache(1, 8, torch.float32, "cpu")
    assert cache.max_len == 256  # rounded up to the bucket: requests share graphs
    got = [model(x[:, :2], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(2, 7)]
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=2e-6, rtol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 2  # one per input shape, not per position or layer
