"""``optim.impl``: the fused / foreach AdamW give the for-loop's weights, ``auto`` picks fused on CPU,
and a loaded optimizer state keeps the configured implementation (older checkpoints hold none)."""

from __future__ import annotations

import pytest
import torch

from elise.bench.train import random_batch
from elise.model import build_model
from elise.model.loss import csm_loss
from elise.optim import build_optimizer, optim_settings, resolve_impl


@pytest.fixture(autouse=True)
def _one_thread():
    """Test-size steps on a busy 2-core machine: one thread (two oversubscribe OpenMP)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SETTINGS = {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.1}


def trained(impl: str, steps: int = 4, start: dict | None = None):
    """A test-size model after ``steps`` AdamW steps on one batch (the same init and decoder frames for
    every impl); ``start``: the model, optimizer and schedule state dicts (and step) to continue from."""
    torch.manual_seed(0)
    model = build_model("test")
    with torch.no_grad():  # non-zero heads: every parameter gets a gradient
        model.codebook0_head.weight.normal_(std=0.1)
        model.audio_head.normal_(std=0.1)
    opt, sched = build_optimizer(model, {**SETTINGS, "impl": impl}, total_steps=10)
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["opt"])
        sched.load_state_dict(start["sched"])
        first = start["step"]
    tokens, mask = random_batch(80, 2, text=8)
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        csm_loss(model, tokens, mask, decoder_fraction=0.5, generator=gen).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                   "step": first + steps}  # fmt: skip
    return model, opt


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_impl_gives_the_for_loop_weights(impl):
    ref, ref_opt = trained("for_loop")
    got, opt = trained(impl)
    assert opt.param_groups[0]["fused"] is (impl == "fused")
    assert opt.param_groups[0]["foreach"] is (impl == "foreach")
    torch.manual_seed(0)
    init = build_model("test").state_dict()
    moved = 0
    for (name, a), b in zip(ref.named_parameters(), got.parameters(), strict=True):
        # within 5e-4 of one step's size (lr 1e-2): rounding (fused adds eps in another order), not drift
        torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-6, msg=name)
        moved += int(not torch.equal(a, init[name]))
    assert moved > 10  # the steps changed the weights (compared, not vacuous)
    m_ref = ref_opt.state[next(ref.parameters())]["exp_avg_sq"]
    torch.testing.assert_close(opt.state[next(got.parameters())]["exp_avg_sq"], m_ref, rtol=1e-5, atol=1e-9)


def test_auto_is_fused_on_cpu_and_bad_names_fail():
    assert resolve_impl("auto", [torch.zeros(2)]) == "fused"
    assert resolve_impl("for_loop", [torch.zeros(2)]) == "for_loop"
    assert optim_settings(None)["impl"] == "auto"
    with pytest.raises(ValueError, match="optim.impl must be one of"):
        optim_settings({"impl": "fast"})


def test_resume_keeps_the_configured_impl_and_continues_exactly():
    """A for-loop checkpoint (flags None, as saved before optim.impl) resumed under fused stays fused;
    resuming a fused run gives exactly the weights of the run without the stop."""
    model, _ = trained("for_loop", steps=2)
    for group in model.state["opt"]["param_groups"]:
        group["fused"] = group["foreach"] = None  # what an older checkpoint holds
    _, opt = trained("fused", steps=2, start=model.state)
    assert all(g["fused"] is True and g["foreach"] is False for g in opt.param_groups)
    half, _ = trained("fused", steps=2)
    resumed, _ = trained("fused", steps=2, start=half.state)
    straight, _ = trained("fused", steps=4)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.audio_head, half.audio_head)  # steps 3-4 moved it


def test_an_older_state_is_loaded_with_the_configured_flags(monkeypatch):
    """torch places each loaded ``step`` counter by the saved groups' flags (fused: on the parameter's
    device, float32); an older checkpoint's groups say None, so the configured flags must be in them
    before torch casts the state (set afterwards, a CUDA fused step would get CPU counters)."""
    model, _ = trained("for_loop", steps=2)
    for group in model.state["opt"]["param_groups"]:
        group["fused"] = group["foreach"] = None
    seen = []
    cast = torch.optim.Optimizer._process_value_according_to_param_policy

    def spy(param, value, param_id, param_groups, key=None):
        seen.append({g["fused"] for g in param_groups})
        return cast(param, value, param_id, param_groups, key)

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", staticmethod(spy))
    trained("fused", steps=1, start=model.state)
    assert seen and all(flags == {True} for flags in seen)


def test_bf16_mixed_clips_the_fused_optimizers_gradients():
    """Lightning refuses to clip for an optimizer that unscales inside its step (fused), even under
    bf16-mixed, which has no scaler; the module clips there as fp32 does."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    from elise.model.presets import preset
    from elise.module import EliseModule

    module = EliseModule(preset("test").to_dict())
    plugin = MixedPrecision("bf16-mixed", "cpu")
    module._trainer = SimpleNamespace(precision_plugin=plugin, gradient_clip_val=1.0)  # type: ignore[assignment]
    opt = module.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["fused"] is True  # auto on CPU, no scaler
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    with pytest.raises(RuntimeError, match="fused"):  # what Lightning itself does
        plugin.clip_gradients(opt, 1.0)
    module.configure_gradient_clipping(opt, 1.0, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert norm == pytest.approx(1.0, rel=1e-3)  # from ~1e4


def test_fused_where_it_cannot_run_is_a_one_line_error():
    """Explicit optim.impl=fused under a scaler with clipping (Lightning would raise at the first step)
    or on a device without the kernel: a ValueError naming the way out, before training starts."""
    params = [torch.zeros(2, requires_grad=True)]
    assert resolve_impl("fused", params) == "fused"
    with pytest.raises(ValueError, match="scaler.*optim.impl=auto"):
        resolve_impl("fused", params, fused_ok=False)
    meta = [torch.zeros(2, device="meta")]
    with pytest.raises(ValueError, match=r"devices \['meta'\]"):
        resolve_impl("fused", meta)
