"""LoRA vs full fine-tuning of one model at the same batch (``elise.model.lora``): tokens (rows) per second
of forward + backward + AdamW step, peak memory (the weights + everything a step allocates above them:
gradients, AdamW state, activations), and checkpoint size (the tensors a training checkpoint holds:
weights + AdamW moments for full; adapters + their moments for LoRA)."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from elise.bench.common import PeakRSS, median
from elise.bench.synth import random_model
from elise.bench.train import random_batch
from elise.model import CSM
from elise.model.lora import LoRAConfig, add_lora, merge_lora
from elise.model.loss import csm_loss


def tensor_bytes(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def measure(
    model: CSM, tokens: torch.Tensor, mask: torch.Tensor, fraction: float, reps: int
) -> dict[str, Any]:
    """``reps`` timed steps after one warm step (which allocates AdamW's state), under one PeakRSS."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = tensor_bytes(list(model.parameters()))
    times = []
    with PeakRSS() as peak:
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
        for i in range(reps + 1):
            start = time.perf_counter()
            g = torch.Generator().manual_seed(i)
            loss = csm_loss(model, tokens, mask, decoder_fraction=fraction, generator=g).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - start)
        del opt
    gc.collect()
    rows = int(mask.any(-1).sum())
    step = median(times)
    return {
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_s": rows / step,
        "step_s": step,
        "peak_mb": (weights + peak.peak_bytes) / 2**20,
        "above_weights_mb": peak.peak_bytes / 2**20,
        "checkpoint_mb": 3 * tensor_bytes(params) / 2**20,  # weights + exp_avg + exp_avg_sq
        "loss": float(loss.detach()),
    }


def bench_lora(
    quick: bool = False, preset: str = "marvis_250m", rank: int = 16, fraction: float = 1 / 16
) -> dict[str, Any]:
    """Full fine-tuning, then LoRA (rank ``rank`` on every attention and MLP projection of both stacks)
    on the same weights and batch. Rows: 256 (quick) or 1,000 in 4 segments."""
    rows, reps = (256, 1) if quick else (1000, 2)
    torch.manual_seed(0)
    model = random_model(preset).train()
    tokens, mask = random_batch(rows, 4)
    full = measure(model.requires_grad_(True), tokens, mask, fraction, reps)
    cfg = LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.0)
    lora = measure(add_lora(model, cfg), tokens, mask, fraction, reps)
    merge_lora(model)
    res: dict[str, Any] = {
        "preset": preset,
        "rows": rows,
        "decoder_fraction": fraction,
        "lora": cfg.to_dict(),
    }
    res["cases"] = {"full": full, f"lora_r{rank}": lora}
    lora["peak_vs_full"] = lora["peak_mb"] / full["peak_mb"]
    lora["speed_vs_full"] = lora["tokens_per_s"] / full["tokens_per_s"]
    lora["targets_met"] = lora["peak_vs_full"] <= 0.5 and lora["speed_vs_full"] >= 1.0
    return res


def lora_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"model": res["preset"], "rows": res["rows"], "case": name, "trainable": c["trainable_params"],
         "tokens/s": c["tokens_per_s"], "step s": c["step_s"], "peak MB": c["peak_mb"],
         "ckpt MB": c["checkpoint_mb"], "x full (peak)": c.get("peak_vs_full"),
         "x full (tokens/s)": c.get("speed_vs_full")}
        for name, c in res["cases"].items()
    ]  # fmt: skip
