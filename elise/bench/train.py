"""Training speed: tokens (rows) per second of forward + backward + AdamW step, and peak memory,
elise ``csm_loss`` vs transformers' CSM training forward (inputs_embeds + 3-D labels) on the same
weights and batch, CPU fp32, and (marvis_250m) bf16 autocast on both sides: the trainer's bf16-mixed,
kept where the CPU's bf16 units make it faster."""

from __future__ import annotations

import contextlib
import gc
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from elise.bench.common import PeakRSS, alternate, median
from elise.bench.synth import random_model, transformers_model
from elise.layout import NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model import CSM
from elise.model.loss import csm_loss, select_decoder_frames


def random_batch(rows: int, items: int, text: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``items`` segments of ``text`` text rows + audio + EOS, ``rows`` rows in all (no padding)."""
    g = torch.Generator().manual_seed(seed)
    per = rows // items
    segs = []
    for _ in range(items):
        codes = torch.randint(1, 2048, (NUM_CODEBOOKS, per - text - 1), generator=g)
        segs.append(segment_rows(torch.randint(3, 250, (text,), generator=g).tolist(), codes))
    return pad_rows(segs)


def transformers_inputs(ref, tokens, mask, fraction: float, seed: int = 0):
    """inputs_embeds from transformers' own embedding modules, and 3-D labels [B, S, 32] where frames
    outside the decoder subset keep only their codebook-0 label (so its decoder trains on as many
    frames as elise's)."""
    audio = mask[..., :NUM_CODEBOOKS].any(-1)  # [B, S]
    labels = torch.where(mask[..., :NUM_CODEBOOKS], tokens[..., :NUM_CODEBOOKS], -100)  # [B, S, 32]
    targets = audio.clone()
    targets[:, 0] = False  # row 0 has no predecessor: never a target (as in elise)
    pos = targets.nonzero()  # [N, 2]
    keep = select_decoder_frames(pos.shape[0], fraction, torch.Generator().manual_seed(seed), "cpu")
    drop = torch.ones(pos.shape[0], dtype=torch.bool)
    drop[keep] = False
    labels[pos[drop, 0], pos[drop, 1], 1:] = -100

    def embed():
        text = ref.embed_text_tokens(tokens[..., 32])  # [B, S, D]
        codes = ref.backbone_model.embed_tokens(tokens[..., :NUM_CODEBOOKS])  # [B, S, D]
        zero = torch.zeros_like(text)
        return torch.where(audio[..., None], codes, torch.where(mask[..., 32:33], text, zero))

    return embed, labels


def step_case(
    model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], rows: int, out: dict
) -> Callable[[], float]:
    """One measurement: a fresh AdamW, one warm step (allocates its state), one timed step; the peak
    memory above the weights over both; then the optimizer state and grads are freed (so two
    models' optimizer states never coexist)."""

    def run() -> float:
        with PeakRSS() as peak:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
            for _ in range(2):
                start = time.perf_counter()
                loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - start
            del opt
        gc.collect()
        out.setdefault("peak_mb", []).append(peak.peak_bytes / 2**20)
        out.setdefault("loss", []).append(float(loss.detach()))
        return elapsed

    return run


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    """bf16: CPU autocast (bf16 matmuls over fp32 master weights, Lightning's bf16-mixed); fp32: nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def bench_train_preset(preset: str, rows: int, items: int, fractions: tuple[float, ...], reps: int,
                       reference: bool = True, dtypes: tuple[str, ...] = ("fp32",)) -> dict[str, Any]:  # fmt: skip
    model: CSM = random_model(preset).train()
    tokens, mask = random_batch(rows, items)
    ref = None
    if reference:
        with tempfile.TemporaryDirectory(prefix="elise_bench_") as d:
            ref = transformers_model(model, d).train()
    extra: dict[str, dict] = {}
    cases = {}
    for dtype in dtypes:
        tag = "" if dtype == "fp32" else f"{dtype}_"
        for f in fractions:
            name = f"elise_{tag}f{f:.4g}"
            extra[name] = {}
            g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

            def elise_loss(
                f: float = f, g: Callable[[], torch.Generator] = g, d: str = dtype
            ) -> torch.Tensor:
                with autocast(d):
                    return csm_loss(model, tokens, mask, decoder_fraction=f, generator=g()).loss

            cases[name] = step_case(model, elise_loss, rows, extra[name])
            if ref is not None:
                rname = f"transformers_{tag}f{f:.4g}"
                extra[rname] = {}
                embed, labels = transformers_inputs(ref, tokens, mask, f)

                def ref_loss(
                    r: torch.nn.Module = ref,
                    e: Callable[[], torch.Tensor] = embed,
                    lab: torch.Tensor = labels,
                    d: str = dtype,
                ) -> torch.Tensor:
                    with autocast(d):
                        return r(inputs_embeds=e(), labels=lab).loss

                cases[rname] = step_case(ref, ref_loss, rows, extra[rname])
    times = alternate(cases, reps, warmup=0)
    res: dict[str, Any] = {"rows": rows, "items": items, "reps": reps, "cases": {}}
    for name, ts in times.items():
        t = median(ts)
        res["cases"][name] = {
            "step_s": t,
            "tokens_per_s": rows / t,
            "peak_mb": median(extra[name]["peak_mb"]),
            "loss": extra[name]["loss"][-1],
        }
    for name, ours in res["cases"].items():
        theirs = res["cases"].get(name.replace("elise_", "transformers_", 1))
        if name.startswith("elise_") and theirs:
            ours["x_transformers"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    for dtype in dtypes[1:]:  # each other dtype against fp32, same side, same fraction
        for name, c in res["cases"].items():
            if f"_{dtype}_" in name:
                c["x_fp32"] = c["tokens_per_s"] / res["cases"][name.replace(f"{dtype}_", "")]["tokens_per_s"]
    gc.collect()
    return res


def bench_train(quick: bool = False, reference: bool = True) -> dict[str, Any]:
    """tiny at 5,000 rows (decoder fraction 1/16 and 1.0) and marvis_250m at 1,000 rows (1/16), fp32 and
    bf16 autocast."""
    torch.manual_seed(0)
    out = {
        "tiny": bench_train_preset(
            "tiny", 2000 if quick else 5000, 10, (1 / 16, 1.0), 2 if quick else 3, reference
        ),
        "marvis_250m": bench_train_preset(
            "marvis_250m", 256 if quick else 1000, 4, (1 / 16,), 1, reference, ("fp32", "bf16")
        ),
    }
    return out


def train_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for preset, r in res.items():
        for name, c in r["cases"].items():
            rows.append({"model": preset, "rows": r["rows"], "case": name, "tokens/s": c["tokens_per_s"],
                         "step s": c["step_s"], "peak MB": c["peak_mb"], "x transformers": c.get("x_transformers"),
                         "x fp32": c.get("x_fp32")})  # fmt: skip
    return rows
