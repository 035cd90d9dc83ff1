"""``python -m elise.bench part=lora`` at the test size: LoRA trains fewer parameters in less memory
than full fine-tuning of the same weights and batch, and leaves the model a plain one."""

from __future__ import annotations

import torch

from elise.bench.lora import bench_lora, lora_rows
from elise.model import CSM
from elise.model.lora import LoRALinear


def test_lora_bench_compares_peak_memory_speed_and_checkpoint_size(monkeypatch):
    import elise.bench.lora as bench

    models: list[CSM] = []
    real = bench.random_model
    monkeypatch.setattr(bench, "random_model", lambda preset: models.append(real(preset)) or models[-1])
    res = bench_lora(quick=True, preset="test", rank=4)
    full, lora = res["cases"]["full"], res["cases"]["lora_r4"]
    assert lora["trainable_params"] < 0.1 * full["trainable_params"]
    assert lora["checkpoint_mb"] < 0.1 * full["checkpoint_mb"]
    assert lora["peak_mb"] < full["peak_mb"] and lora["peak_vs_full"] == lora["peak_mb"] / full["peak_mb"]
    assert torch.isfinite(torch.tensor([full["loss"], lora["loss"]])).all()
    assert not any(isinstance(m, LoRALinear) for m in models[0].modules())  # merged back
    assert [r["case"] for r in lora_rows(res)] == ["full", "lora_r4"]
