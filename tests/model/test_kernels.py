"""Per-machine kernel choice (``quantize=auto``): candidates timed on the model's shapes, timings cached
per machine, the fastest candidate per row-count class that passes the agreement check (teacher-forced
codes equal to fp32's, judged on a trained model) applied, the choice logged."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from elise.bench.synth import fitted_demo, random_model
from elise.generate import generate
from elise.layout import CODEBOOK_SIZE, NUM_CODEBOOKS
from elise.model import kernels, quant
from elise.model.kernels import (
    CANDIDATES,
    ROWS,
    agreement,
    check_candidates,
    choose_kernels,
    machine_key,
    teacher_forced,
)
from elise.model.quant import Bf16Matmul, Int4Matmul, Int8Matmul, RowDispatch, row_class
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


@pytest.fixture(scope="module")
def demo():
    """The demo model fitted to one clip (a trained model's peaked logits) and its probe."""
    return fitted_demo()


def test_fastest_candidate_failing_the_agreement_check_is_rejected(tmp_path, caplog, demo, monkeypatch):
    """On the fitted demo model plain int4 (min/max groups, heads and projection int4 too) flips 1.13 %
    of the codes (rejected), bf16 0.25 % (kept); the logs name both, with every candidate's timings."""
    monkeypatch.setattr(quant, "INT4_SHRINKS", ())  # min/max groups: no clipping search, no fit
    monkeypatch.setattr(quant, "SENSITIVE", {})  # the depth heads and projection in int4 too
    model, probe_ = demo
    model = copy.deepcopy(model)
    cache = tmp_path / "kernels.json"
    seed_cache(cache, model, fake_timings(("int4", "bf16", "int8", "fp32")))
    with caplog.at_level(logging.INFO, logger="elise.model.kernels"):
        choice = choose_kernels(model, cache=cache, probe=probe_)
    assert choice.mode == "bf16" and choice.cached and choice.plan == {n: "bf16" for n in ROWS}
    assert (
        choice.agreement["int4"].codes_equal
        < kernels.MIN_CODE_AGREEMENT
        <= choice.agreement["bf16"].codes_equal
    )
    assert isinstance(model.backbone.layers[0].self_attn.fast["qkv"], Bf16Matmul)
    assert isinstance(model.fast["codebook0_head"], Bf16Matmul)
    # the model now decodes the probe with bf16's agreement
    again = agreement(teacher_forced(copy.deepcopy(demo[0]), probe_), teacher_forced(model, probe_))
    assert again.codes_equal == choice.agreement["bf16"].codes_equal
    text = caplog.text
    assert "frame bf16, batch8 bf16, prefill bf16" in text and "rejected by the agreement check: int4" in text
    order = ("int4", "bf16", "int8", "fp32")  # the fake timings: 1, 2, 3, 4 ms
    assert all(f" {c}: frame {order.index(c) + 1:.1f} ms" in text for c in CANDIDATES)


def test_each_row_count_class_gets_its_fastest_passing_candidate(tmp_path, demo):
    """int8 fastest at 1 row, bf16 at 8 rows and prefill: one RowDispatch per matmul runs int8 for a
    batch-1 step and bf16 for a batch of 8 and a prefill; the choice is the same as each alone."""
    model, probe_ = demo
    model = copy.deepcopy(model)
    cache = tmp_path / "kernels.json"
    timings = fake_timings(("int8", "bf16", "int4", "fp32"))
    for name in ("batch8", "prefill"):
        timings["bf16"][name], timings["int8"][name] = 1e-3, 2e-3
    seed_cache(cache, model, timings)
    choice = choose_kernels(model, cache=cache, probe=probe_)
    assert choice.plan == {"frame": "int8", "batch8": "bf16", "prefill": "bf16"}
    assert choice.mode == "frame=int8,batch8=bf16,prefill=bf16"
    qkv = model.decoder.layers[0].self_attn.fast["qkv"]
    assert isinstance(qkv, RowDispatch)
    assert isinstance(qkv.by_class["frame"], Int8Matmul) and isinstance(qkv.by_class["prefill"], Bf16Matmul)
    assert qkv.by_class["batch8"] is qkv.by_class["prefill"]  # one bf16 copy of the weight
    assert [row_class(r) for r in (1, 2, 3, 16, 17, 64)] == [
        "frame",
        "frame",
        "batch8",
        "batch8",
        "prefill",
        "prefill",
    ]
    x = torch.randn(8, model.cfg.decoder.dim)
    assert torch.equal(qkv(x[:1]), qkv.by_class["frame"](x[:1]))
    assert torch.equal(qkv(x), qkv.by_class["batch8"](x))
    assert not torch.equal(qkv(x)[:1], qkv(x[:1]))  # int8 and bf16 round differently


def test_agreement_is_judged_on_a_separate_trained_model(tmp_path, demo):
    """Random tiny weights are timed (their shapes), the fitted demo model judges: bf16 passes there
    although on the random weights themselves it flips more than 1 % of the codes."""
    model = fused_tiny(1)
    assert not check_candidates(model, ["bf16"])["bf16"].passed  # near-flat random logits
    cache = tmp_path / "kernels.json"
    seed_cache(cache, model, fake_timings(("bf16", "fp32", "int8", "int4")))
    choice = choose_kernels(model, cache=cache, judge=copy.deepcopy(demo[0]), probe=demo[1])
    assert choice.mode == "bf16" and choice.judge == "a separate judge model"
    assert isinstance(model.fast["codebook0_head"], Bf16Matmul)


def test_fp32_fastest_keeps_the_model_unquantized(tmp_path):
    model = fused_tiny()
    cache = tmp_path / "kernels.json"
    seed_cache(cache, model, fake_timings(("fp32", "int4", "int8", "bf16")))
    choice = choose_kernels(model, cache=cache)
    assert choice.mode == "fp32" and choice.agreement == {}  # nothing faster to check
    assert "o" not in model.backbone.layers[0].self_attn.fast  # only the fp32 fusion is attached
    assert "1.00x fp32" in choice.reason


def test_teacher_forced_probe_is_the_generation_loop():
    """Free-running (no codes) the probe's codes are ``generate``'s greedy codes; forced with them, the
    same codes and logits come back."""
    model = fused_tiny(2)
    probe_ = kernels.default_probe(frames=3)
    logits, codes = teacher_forced(model, probe_)
    got, _ = generate(model, probe_.tokens[None], probe_.mask[None], 3, kernels.GREEDY, stop_on_eos=False)
    assert torch.equal(codes.t(), got[0])
    forced = teacher_forced(model, kernels.Probe(probe_.tokens, probe_.mask, codes))
    assert torch.equal(forced[1], codes) and torch.equal(forced[0], logits)
    assert logits.shape == (3, NUM_CODEBOOKS, CODEBOOK_SIZE)


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


def test_the_timing_cache_key_names_the_dtype_and_the_candidates_version():
    """Timings of an fp32 model are not reused for a bf16 one, nor timings cached before a candidate's
    kernels changed (int4 with its sensitive matmuls int8: KEY_VERSION)."""
    from elise.model import build_model
    from elise.model.kernels import KEY_VERSION
    from elise.model.presets import preset

    model = build_model(preset("test"))
    fp32 = machine_key(model, torch.device("cpu"))
    assert fp32.endswith(f"|torch.float32|{KEY_VERSION}")
    assert machine_key(model.to(torch.bfloat16), torch.device("cpu")) != fp32
