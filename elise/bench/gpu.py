"""GPU figures (only with CUDA): marvis_250m bf16 training tokens/s and MFU; synthesis RTF and time to
the first chunk with torch.compile. Skipped, with a line saying so, on a machine without CUDA."""

from __future__ import annotations

import time
from typing import Any

import torch

from elise.bench.common import alternate, median
from elise.bench.synth import FRAME_SECONDS, GREEDY, prompt, random_model
from elise.bench.train import random_batch
from elise.generate import generate
from elise.model.loss import csm_loss

# dense bf16 peak FLOP/s of common cards (no sparsity), for MFU
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def train_flops_per_row(model, decoder_fraction: float) -> float:
    """6 x parameters touched per row: the backbone for every row, the decoder (32 positions) for the
    trained fraction, the heads (attention FLOPs left out: short sequences)."""
    cfg = model.cfg
    heads = (
        cfg.backbone.dim * cfg.audio_vocab_size
        + decoder_fraction * 31 * cfg.decoder.dim * cfg.audio_vocab_size
    )
    decoder = decoder_fraction * cfg.num_codebooks * cfg.decoder.num_block_params()
    return 6.0 * (cfg.backbone.num_block_params() + decoder + heads)


def bench_gpu(quick: bool = False) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine: GPU figures not measured"}
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    res: dict[str, Any] = {"device": name}

    # training: bf16 autocast over fp32 master weights (the trainer's bf16-mixed), fused AdamW
    model = random_model("marvis_250m").to(dev).train()
    rows = 2000 if quick else 5000
    tokens, mask = (t.to(dev) for t in random_batch(rows, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)

    def step() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = csm_loss(model, tokens, mask, decoder_fraction=1 / 16).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    torch.cuda.reset_peak_memory_stats()
    t = median(alternate({"train": step}, 3 if quick else 10, warmup=2)["train"])
    tps = rows / t
    peak = peak_flops(name)
    res["train_bf16"] = {
        "rows": rows,
        "step_s": t,
        "tokens_per_s": tps,
        "mfu": tps * train_flops_per_row(model, 1 / 16) / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    opt.state.clear()  # free the optimizer state before synthesis
    model.zero_grad(set_to_none=True)

    # synthesis: bf16 weights, compiled decode steps (CUDA graphs); RTF and time to the first frame's codes
    model = model.eval().to(torch.bfloat16).fuse().compile_steps()
    _, toks, msk = prompt()
    toks, msk = toks.to(dev), msk.to(dev)
    frames = 32 if quick else 125
    first: list[float] = []

    def synth() -> float:
        stamps: list[float] = []
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, toks[None], msk[None], frames, GREEDY, stop_on_eos=False,
                 on_frame=lambda c, f: stamps.append(time.perf_counter()))  # fmt: skip
        torch.cuda.synchronize()
        first.append(stamps[0] - start)
        return time.perf_counter() - start

    t = median(alternate({"synth": synth}, 3, warmup=2)["synth"])  # warm-up rounds compile
    res["synth_bf16_compiled"] = {
        "frames": frames,
        "rtf": t / (frames * FRAME_SECONDS),
        "time_to_first_chunk_s": median(first[2:]),
    }
    return res
