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
from elise.optim import impl_flags, resolve_impl

# AdamW implementations each case also times an optimizer step of (for the same-implementation ratios)
OPTIM_IMPLS = ("fused", "for_loop")


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


def transformers_default_optim() -> tuple[str, str]:
    """(name, impl): the optimizer a transformers ``Trainer`` user gets with the installed versions
    (``TrainingArguments.optim``'s default: ``adamw_torch_fused`` from torch 2.8 on, ``adamw_torch``,
    torch's default implementation, i.e. the for-loop on CPU, before) and the AdamW implementation it is."""
    import dataclasses

    import transformers

    field = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}["optim"]
    name = str(getattr(field.default, "value", field.default))
    return name, "fused" if name == "adamw_torch_fused" else "for_loop"


def _adamw(params, impl: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), **impl_flags(impl))


def step_case(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    rows: int,
    out: dict,
    impl: str = "fused",
    also: tuple[str, ...] = OPTIM_IMPLS,
) -> Callable[[], float]:
    """One measurement: a fresh AdamW (implementation ``impl``), one warm step (allocates its state),
    one timed step (forward + backward and optimizer step timed apart); the peak memory above the
    weights over both. Then, on the timed step's gradients, the optimizer step of every implementation
    in ``also`` (a warm step, then a timed one); then the state and grads are freed (so two models'
    optimizer states never coexist)."""

    def run() -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        with PeakRSS() as peak:
            opt = _adamw(params, impl)
            for i in range(2):
                start = time.perf_counter()
                loss = loss_fn()
                loss.backward()
                mid = time.perf_counter()
                opt.step()
                end = time.perf_counter()
                if i == 0:
                    opt.zero_grad(set_to_none=True)
            del opt
        gc.collect()
        out.setdefault("fwd_bwd_s", []).append(mid - start)
        out.setdefault("opt_s", []).append(end - mid)
        out.setdefault(f"opt_{impl}_s", []).append(end - mid)
        for other in also:
            if other != impl:
                opt = _adamw(params, other)
                opt.step()
                t0 = time.perf_counter()
                opt.step()
                out.setdefault(f"opt_{other}_s", []).append(time.perf_counter() - t0)
                del opt
                gc.collect()
        model.zero_grad(set_to_none=True)
        out.setdefault("peak_mb", []).append(peak.peak_bytes / 2**20)
        out.setdefault("loss", []).append(float(loss.detach()))
        return end - start

    return run


def versus(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """Speed ratios elise / transformers: ``x_transformers`` each side with its own optimizer (elise's
    auto, transformers' default), ``x_transformers_fwd_bwd`` forward + backward only, and per AdamW
    implementation ``x_transformers_<impl>``: both sides' forward + backward plus that implementation's
    optimizer step (timed on the same step's gradients)."""
    out = {
        "x_transformers": theirs["step_s"] / ours["step_s"],
        "x_transformers_fwd_bwd": theirs["fwd_bwd_s"] / ours["fwd_bwd_s"],
    }
    for impl in OPTIM_IMPLS:
        key = f"opt_{impl}_s"
        if key in ours and key in theirs:
            out[f"x_transformers_{impl}"] = (theirs["fwd_bwd_s"] + theirs[key]) / (
                ours["fwd_bwd_s"] + ours[key]
            )
    return out


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    """bf16: CPU autocast (bf16 matmuls over fp32 master weights, Lightning's bf16-mixed); fp32: nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def bench_train_preset(preset: str, rows: int, items: int, fractions: tuple[float, ...], reps: int,
                       reference: bool = True, dtypes: tuple[str, ...] = ("fp32",)) -> dict[str, Any]:  # fmt: skip
    model: CSM = random_model(preset).train()
    tokens, mask = random_batch(rows, items)
    impl = resolve_impl("auto", model.parameters())  # what elise's trainer runs (optim.impl=auto)
    ref = None
    res: dict[str, Any] = {"rows": rows, "items": items, "reps": reps, "elise_optim": impl, "cases": {}}
    if reference:
        with tempfile.TemporaryDirectory(prefix="elise_bench_") as d:
            ref = transformers_model(model, d).train()
        res["transformers_optim"], ref_impl = transformers_default_optim()
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

            cases[name] = step_case(model, elise_loss, rows, extra[name], impl)
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

                cases[rname] = step_case(ref, ref_loss, rows, extra[rname], ref_impl)
    times = alternate(cases, reps, warmup=0)
    for name, ts in times.items():
        t = median(ts)
        res["cases"][name] = {
            "step_s": t,
            "tokens_per_s": rows / t,
            "peak_mb": median(extra[name]["peak_mb"]),
            "loss": extra[name]["loss"][-1],
            **{k: median(v) for k, v in extra[name].items() if k.endswith("_s")},
        }
    for name, ours in res["cases"].items():
        theirs = res["cases"].get(name.replace("elise_", "transformers_", 1))
        if name.startswith("elise_") and theirs:
            ours.update(versus(ours, theirs))
    for dtype in dtypes[1:]:  # each other dtype against fp32, same side, same fraction
        for name, c in res["cases"].items():
            if f"_{dtype}_" in name:
                c["x_fp32"] = c["tokens_per_s"] / res["cases"][name.replace(f"{dtype}_", "")]["tokens_per_s"]
    gc.collect()
    return res


def bench_train(quick: bool = False, reference: bool = True) -> dict[str, Any]:
    """tiny at 5,000 rows (decoder fraction 1/16 and 1.0) and marvis_250m at 1,000 rows (1/16), fp32 and
    bf16 autocast; elise with its ``optim.impl=auto`` AdamW, transformers with its Trainer's default."""
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
                         "step s": c["step_s"], "fwd+bwd s": c["fwd_bwd_s"],
                         "adamw s": c["opt_s"],
                         "peak MB": c["peak_mb"], "x transformers": c.get("x_transformers"),
                         "x fwd+bwd": c.get("x_transformers_fwd_bwd"), "x both fused": c.get("x_transformers_fused"),
                         "x both for-loop": c.get("x_transformers_for_loop"), "x fp32": c.get("x_fp32")})  # fmt: skip
    return rows
