"""Per-machine kernel choice (``quantize=auto``): candidates timed on the model's shapes, timings cached
per machine, the fastest candidate that passes the agreement check applied, the choice logged."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from elise.bench.synth import random_model
from elise.model import kernels
from elise.model.kernels import CANDIDATES, ROWS, choose_kernels, machine_key, probe, probe_error
from elise.model.quant import Bf16Matmul, Int4Matmul, Int8Matmul
from elise.synthesis.errors import SynthesisError
from elise.synthesis.runtime import prepare_model


def fused_tiny(seed: int = 0):
    return prepare_model(random_model("tiny", seed=seed), torch.float32)


def fake_timings(order: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Timings making ``order`` fastest first (1 ms, 2 ms, ...)."""
    return {c: {name: 1e-3 * (order.index(c) + 1) for name in ROWS} for c in CANDIDATES}


def seed_cache(path, model, timings) -> None:
    key = machine_key(model, torch.device("cpu")) + "|" + ",".join(CANDIDATES)
    path.write_text(json.dumps({key: {"timings": timings, "date": "test"}}))


def test_timings_of_every_candidate_are_measured_then_cached(tmp_path, monkeypatch):
    model = fused_tiny()
    cache = tmp_path / "kernels.json"
    first = choose_kernels(model, cache=cache, reps=1)
    assert not first.cached and set(first.timings) == set(CANDIDATES)
    assert all(set(t) == set(ROWS) and min(t.values()) > 0 for t in first.timings.values())
    (key, entry), = json.loads(cache.read_text()).items()  # fmt: skip
    assert kernels.cpu_name() in key and torch.__version__ in key and entry["timings"] == first.timings

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again although this machine's timings are cached")

    monkeypatch.setattr(kernels, "time_candidates", no_timing)
    again = choose_kernels(fused_tiny(), cache=cache)
    assert again.cached and again.timings == first.timings and again.mode == first.mode


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ELISE_CACHE_DIR", str(tmp_path / "c"))
    assert kernels.cache_file() == tmp_path / "c" / "kernels.json"
    monkeypatch.delenv("ELISE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert kernels.cache_file() == tmp_path / "x" / "elise" / "kernels.json"


def test_fastest_candidate_failing_the_agreement_check_is_rejected(tmp_path, caplog):
    """Random weights: int4's logits are far from fp32's (rejected), bf16's close (kept)."""
    model = fused_tiny(1)
    cache = tmp_path / "kernels.json"
    seed_cache(cache, model, fake_timings(("int4", "bf16", "int8", "fp32")))
    reference, codes = probe(model)
    with caplog.at_level(logging.INFO, logger="elise.model.kernels"):
        choice = choose_kernels(model, cache=cache)
    assert choice.mode == "bf16" and choice.cached
    assert choice.errors["int4"] > kernels.MAX_REL_ERROR >= choice.errors["bf16"]
    assert isinstance(model.backbone.layers[0].self_attn.fast["qkv"], Bf16Matmul)
    assert isinstance(model.fast["codebook0_head"], Bf16Matmul)
    assert probe_error(reference, probe(model, codes)[0]) == pytest.approx(choice.errors["bf16"])
    text = caplog.text
    assert "chose bf16" in text and "rejected by the agreement check: int4" in text
    order = ("int4", "bf16", "int8", "fp32")  # the fake timings: 1, 2, 3, 4 ms
    assert all(f" {c}: frame {order.index(c) + 1:.1f} ms" in text for c in CANDIDATES)


def test_fp32_fastest_keeps_the_model_unquantized(tmp_path):
    model = fused_tiny()
    cache = tmp_path / "kernels.json"
    seed_cache(cache, model, fake_timings(("fp32", "int4", "int8", "bf16")))
    choice = choose_kernels(model, cache=cache)
    assert choice.mode == "fp32" and choice.errors == {}
    assert "o" not in model.backbone.layers[0].self_attn.fast  # only the fp32 fusion is attached
    assert "1.00x fp32" in choice.reason


def test_prepare_model_quantize_values(tmp_path, monkeypatch):
    monkeypatch.setenv("ELISE_CACHE_DIR", str(tmp_path))
    for mode, cls in (("int8", Int8Matmul), ("int4", Int4Matmul), ("bf16", Bf16Matmul)):
        model = prepare_model(random_model("tiny"), torch.float32, quantize=mode)
        assert isinstance(model.decoder.layers[0].mlp.fast["down"], cls)
    for off in (None, "none"):
        model = prepare_model(random_model("tiny"), torch.float32, quantize=off)
        assert "down" not in model.decoder.layers[0].mlp.fast
    prepare_model(random_model("tiny"), torch.float32, quantize="auto")
    assert (tmp_path / "kernels.json").is_file()  # auto timed the candidates and cached them
    with pytest.raises(SynthesisError, match="use auto, none, int8, int4, bf16"):
        prepare_model(random_model("tiny"), torch.float32, quantize="int3")
