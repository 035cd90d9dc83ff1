"""Synthesis speed: elise vs transformers ``CsmForConditionalGeneration.generate`` on the same random
weights, CPU; per-frame time, RTF (a Mimi frame is 80 ms of audio), the memory-bandwidth bound,
int8 / int4 / bf16 matmuls, the per-machine kernel choice (``quantize=auto``), and batch throughput."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from elise.bench.common import alternate, median, memory_bandwidth, table
from elise.generate import SamplingConfig, generate
from elise.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, pad_rows, segment_rows
from elise.model import CSM, build_model
from elise.model.kernels import MIN_CODE_AGREEMENT, Probe, check_candidates, choose_kernels, default_probe
from elise.model.loss import csm_loss
from elise.model.quant import INT4_GROUP, quantize

FRAME_SECONDS = 0.08  # 1920 samples at 24 kHz
GREEDY = SamplingConfig(temperature=1.0, top_k=1)
SPARE = [2048, 2049, 2050]


def random_model(preset: str, seed: int = 0) -> CSM:
    """Random weights with random heads (from-scratch heads are zero: every logit equal)."""
    torch.manual_seed(seed)
    model = build_model(preset).eval()
    with torch.no_grad():
        model.codebook0_head.weight.normal_(std=model.cfg.backbone.dim**-0.5)
        model.audio_head.normal_(std=model.cfg.decoder.dim**-0.5)
    return model


def prompt(n_text: int = 24) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    text_ids = [1] + [3 + (7 * i) % 250 for i in range(n_text - 2)] + [2]
    tokens, mask = segment_rows(text_ids, None, eos=False)  # [S, 33]
    return text_ids, tokens, mask


def weight_bytes_per_frame(
    model: CSM, bytes_per_weight: float, sensitive_bytes: float | None = None
) -> float:
    """Weights one frame must read: backbone blocks once, decoder blocks 31 times, the codebook-0 head,
    31 decoder heads and 31 decoder-input projections (norm weights included, embeddings rows not).
    ``sensitive_bytes``: per weight of the depth heads and the projection (int4 keeps them int8)."""
    cfg = model.cfg
    v, dd, db = cfg.audio_vocab_size, cfg.decoder.dim, cfg.backbone.dim
    n = cfg.backbone.num_block_params() + (cfg.num_codebooks - 1) * cfg.decoder.num_block_params()
    sensitive = (cfg.num_codebooks - 1) * (dd * v + db * dd)
    width = bytes_per_weight if sensitive_bytes is None else sensitive_bytes
    return (n + db * v) * bytes_per_weight + sensitive * width


def fast_state(model: CSM) -> list[tuple[Any, dict]]:
    return [(m, dict(m.__dict__["fast"])) for m in model.modules() if "fast" in m.__dict__]


def set_fast_state(state: list[tuple[Any, dict]]) -> None:
    for m, fast in state:
        m.__dict__["fast"] = dict(fast)


def elise_frame_time(model: CSM, tokens, mask, frames: int, batch: int = 1) -> float:
    """Median seconds per frame (prefill excluded) of elise's generate, EOS disabled."""
    stamps: list[float] = []
    t = tokens[None].expand(batch, -1, -1)
    m = mask[None].expand(batch, -1, -1)
    generate(
        model,
        t,
        m,
        frames,
        GREEDY,
        stop_on_eos=False,
        on_frame=lambda c, f: stamps.append(time.perf_counter()),
    )
    return median([b - a for a, b in zip(stamps, stamps[1:], strict=False)])


def elise_codes(model: CSM, tokens, mask, frames: int) -> torch.Tensor:
    codes, _ = generate(model, tokens[None], mask[None], frames, GREEDY, stop_on_eos=False)
    return codes[0]  # [32, F]


def demo_clip(seed: int = 0, n_text: int = 5, n_frames: int = 40) -> tuple[Tensor, Tensor]:
    """Rows [S, 33] of a random clip: ``n_text`` byte-text rows, ``n_frames`` frames, the EOS frame."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 259, (n_text,), generator=g).tolist()
    return segment_rows(text, torch.randint(0, CODEBOOK_SIZE, (NUM_CODEBOOKS, n_frames), generator=g))


def fitted_demo(steps: int = 12) -> tuple[CSM, Probe]:
    """The demo preset fitted to one clip (logits as peaked as a trained model's on its data; seconds
    on a CPU) and its agreement probe: the clip's first 20 rows as prompt, its 21 later frames forced."""
    torch.manual_seed(0)
    model = build_model("demo")
    tokens, mask = pad_rows([demo_clip()])
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        loss = csm_loss(model, tokens, mask, decoder_fraction=1.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, mask = tokens[0], mask[0]
    probe = Probe(tokens[:20], mask[:20], tokens[20:-1, :NUM_CODEBOOKS])  # the last row is the EOS frame
    return model.eval().requires_grad_(False).fuse(), probe


def judge_model(ckpt: str | None) -> tuple[CSM, Probe | None, str]:
    """The trained model the agreement check runs on: ``ckpt`` (an elise checkpoint or transformers
    directory; the default probe), else the fitted demo model (its clip as probe)."""
    if not ckpt:
        model, probe = fitted_demo()
        return model, probe, "the demo model fitted to one clip"
    from elise.checkpoints import load_model

    model = load_model(ckpt, torch.device("cpu")).model
    return model.float().eval().requires_grad_(False).fuse(), None, f"checkpoint {ckpt}"


def transformers_model(model: CSM, workdir: str):
    """Export elise's weights to a transformers csm directory and load it there (fp32, eval)."""
    import transformers

    from elise.interop import export_transformers_dir
    from elise.text import ByteTokenizer

    mimi = transformers.MimiConfig(  # a tiny codec: generate() never runs it, but the config needs one
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        intermediate_size=64, num_filters=8, codebook_dim=16, num_quantizers=32,
        vector_quantization_hidden_dimension=16, upsample_groups=64,
    )  # fmt: skip
    out = f"{workdir}/csm"
    export_transformers_dir(model, ByteTokenizer(), out, mimi.to_dict())  # returns the files written
    ref = transformers.CsmForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    shutil.rmtree(out, ignore_errors=True)  # it is in memory now
    return ref


class _Stamps:
    """A transformers streamer that timestamps every frame ``generate`` emits."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_frame_time(ref, text_ids: list[int], frames: int) -> tuple[float, int]:
    """Median seconds per frame of transformers' generate (prefill excluded), and frames produced."""
    streamer = _Stamps()
    with torch.inference_mode():
        out = ref.generate(
            input_ids=torch.tensor([text_ids]), max_new_tokens=frames, min_new_tokens=frames,
            do_sample=False, depth_decoder_do_sample=False, suppress_tokens=SPARE,
            depth_decoder_suppress_tokens=SPARE, streamer=streamer,
        )  # fmt: skip
    stamps = streamer.times[1:]  # the first put is the prompt
    return median([b - a for a, b in zip(stamps, stamps[1:], strict=False)]), int(out.shape[1])


def bench_synth(
    preset: str = "marvis_250m",
    frames: int = 16,
    ref_frames: int = 8,
    reps: int = 3,
    batches: tuple[int, ...] = (4, 8),
    reference: bool = True,
    warmup: int = 1,
    ckpt: str | None = None,
) -> dict[str, Any]:
    """All synthesis figures (see BENCHMARKS.md). ``frames``/``ref_frames``: frames timed per repetition
    for elise / transformers (per-frame medians; RTF for 125 frames is the same per-frame figure).
    ``ckpt``: the trained model that judges the agreement (None: the demo model fitted to one clip)."""
    res: dict[str, Any] = {
        "preset": preset,
        "frames_timed": frames,
        "ref_frames_timed": ref_frames,
        "reps": reps,
    }
    res["bandwidth_gbs"] = memory_bandwidth()
    model = random_model(preset)
    text_ids, tokens, mask = prompt()
    workdir = tempfile.mkdtemp(prefix="elise_bench_")
    ref = transformers_model(model, workdir) if reference else None

    plain = fast_state(model)
    model.fuse()
    # the kernel choice quantize=auto makes on this machine (timed fresh: no cache) on the marvis_250m
    # shapes, the agreement judged on a trained model; its reasons
    judge, judge_probe, judge_name = judge_model(ckpt)
    cache = tempfile.mkdtemp(prefix="elise_kernels_")
    choice = choose_kernels(model, cache=Path(cache) / "kernels.json", judge=judge, probe=judge_probe)
    shutil.rmtree(cache, ignore_errors=True)
    res["kernel_choice"] = {"plan": choice.plan, "reason": choice.reason, "table": choice.table(),
                            "timings_s": choice.timings, "judge": judge_name,
                            "agreement": {c: vars(a) for c, a in choice.agreement.items()}}  # fmt: skip
    auto = fast_state(model)
    # the same check on the random weights, for the record (near-flat logits: a poor judge)
    set_fast_state(plain)
    model.fuse()
    modes = ("int8", "int4", "bf16")
    random_check = check_candidates(model, list(modes), default_probe(frames=frames))
    res["agreement_random_weights"] = {c: vars(a) for c, a in random_check.items()}
    fused = fast_state(model)
    states = {"fp32": fused}
    for mode in modes:
        set_fast_state(fused)
        quantize(model, mode)
        states[mode] = fast_state(model)
    states["auto"] = auto

    def run(state, batch=1, n=frames):
        def case() -> float:
            set_fast_state(state)
            return elise_frame_time(model, tokens, mask, n, batch)

        return case

    cases = {"elise_fp32": run(fused), "elise_fp32_unfused": run(plain)}
    cases.update({f"elise_{mode}": run(states[mode]) for mode in (*modes, "auto")})
    if ref is not None:
        produced: list[int] = []

        def ref_case() -> float:
            t, got = transformers_frame_time(ref, text_ids, ref_frames)
            produced.append(got)
            return t

        cases["transformers_fp32"] = ref_case
    times = alternate(cases, reps, warmup=warmup)
    per_frame = {k: median(v) for k, v in times.items()}
    res["per_frame_s"] = per_frame
    res["all_times_s"] = times
    res["rtf"] = {k: v / FRAME_SECONDS for k, v in per_frame.items()}
    res["frames_per_s"] = {k: 1 / v for k, v in per_frame.items()}
    if ref is not None:
        t_ref = per_frame["transformers_fp32"]
        res["speedup_vs_transformers"] = {
            k: t_ref / v for k, v in per_frame.items() if k != "transformers_fp32"
        }

    # bytes per weight: int8 + fp32 scale per row (~0), int4 + bf16 scale and offset per group
    widths = {
        "fp32": (4.0, None),
        "int8": (1.0, None),
        "int4": (0.5 + 4 / INT4_GROUP, 1.0),
        "bf16": (2.0, None),
    }
    for name, (width, sensitive) in widths.items():
        b = weight_bytes_per_frame(model, width, sensitive)
        bound = b / (res["bandwidth_gbs"] * 1e9)
        res[f"bound_{name}"] = {
            "bytes_per_frame": b,
            "bound_s": bound,
            "fraction": bound / per_frame[f"elise_{name}"],
        }

    # int8 / int4 / bf16 codes vs fp32, free running (fused fp32 rounds differently from the unfused
    # matmuls: near-ties may flip, so its agreement is reported too)
    set_fast_state(plain)
    plain_codes = elise_codes(model, tokens, mask, frames)
    set_fast_state(fused)
    fp32_codes = elise_codes(model, tokens, mask, frames)
    res["fused_frames_equal_unfused"] = float((fp32_codes == plain_codes).all(0).float().mean())
    for mode in modes:
        set_fast_state(states[mode])
        codes = elise_codes(model, tokens, mask, frames)
        res[f"{mode}_free_running_frames_equal"] = float((codes == fp32_codes).all(0).float().mean())
    if ref is not None:
        # same weights, same greedy decisions: elise's codes must be transformers' codes
        n_eq = min(4, plain_codes.shape[1])
        with torch.inference_mode():
            ref_codes = ref.generate(
                input_ids=torch.tensor([text_ids]), max_new_tokens=n_eq, min_new_tokens=n_eq, do_sample=False,
                depth_decoder_do_sample=False, suppress_tokens=SPARE, depth_decoder_suppress_tokens=SPARE,
            )[0].t()  # fmt: skip
        res["codes_equal_transformers"] = bool(torch.equal(ref_codes, plain_codes[:, :n_eq]))

    # batch throughput: total frames/s at batch B vs batch 1 (fp32, int8, int4, bf16, auto's plan)
    batch_cases = {}
    for name, state in states.items():
        for b in (1, *batches):
            batch_cases[f"{name}_b{b}"] = run(state, b, max(4, frames // 2))
    btimes = {k: median(v) for k, v in alternate(batch_cases, max(1, reps - 1), warmup=0).items()}
    res["batch"] = {
        k: {"per_frame_s": v, "total_frames_per_s": int(k.split("_b")[1]) / v, "vs_b1": None}
        for k, v in btimes.items()
    }
    for k, row in res["batch"].items():
        base = res["batch"][k.split("_b")[0] + "_b1"]["total_frames_per_s"]
        row["vs_b1"] = row["total_frames_per_s"] / base
    set_fast_state(plain)
    shutil.rmtree(workdir, ignore_errors=True)
    return res


def synth_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows for the printed summary."""
    rows = []
    speed = res.get("speedup_vs_transformers", {})
    for k, t in res["per_frame_s"].items():
        rows.append(
            {
                "case": k,
                "s/frame": t,
                "frames/s": 1 / t,
                "RTF": t / FRAME_SECONDS,
                "x transformers": speed.get(k),
            }
        )
    return rows


def synth_text(res: dict[str, Any]) -> str:
    """The printed synth part: per-frame table, bandwidth bound, agreement, kernel choice, batches."""
    text = table(synth_rows(res), ["case", "s/frame", "frames/s", "RTF", "x transformers"])
    bound = res["bound_fp32"], res["bound_int8"]
    choice = res["kernel_choice"]
    agree = lambda d: ", ".join(  # noqa: E731
        f"{c} {a['codes_equal']:.2%} (logit error {a['logit_error']:.4f})" for c, a in d.items()
    )
    text += (
        f"\nmemory read bandwidth {res['bandwidth_gbs']:.1f} GB/s; bound fp32 {bound[0]['bound_s']:.3f} s/frame "
        f"(elise reaches {bound[0]['fraction']:.0%}), int8 {bound[1]['bound_s']:.3f} s/frame "
        f"({bound[1]['fraction']:.0%})\n"
        f"teacher-forced codes equal to fp32 on the random weights (a poor judge): "
        f"{agree(res['agreement_random_weights'])}\n"
        f"... on {choice['judge']} (decides, >= {MIN_CODE_AGREEMENT:.0%}): {agree(choice['agreement'])}\n"
        f"free-running frames equal to fp32 (random weights): "
        + ", ".join(f"{m} {res[f'{m}_free_running_frames_equal']:.0%}" for m in ("int8", "int4", "bf16"))
        + f"\nkernel choice (quantize=auto) on this machine: {choice['reason']}\n"
        "matmul time per candidate (frame: 1 row, batch8: 8 rows, per frame; prefill: 64 rows; * kept):\n"
        f"{choice['table']}\n"
    )
    return text + table([{"case": k, **v} for k, v in res["batch"].items()],
                        ["case", "per_frame_s", "total_frames_per_s", "vs_b1"])  # fmt: skip
