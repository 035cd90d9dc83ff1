"""Per-machine matmul choice for synthesis (``quantize=auto``): the fastest weight format that agrees
with fp32.

CPUs differ: on the AMD EPYC (Zen 4) dev box int8 and int4 weight-only kernels read weights fastest at
batch 1, on an Intel Xeon with AMX bf16 products run ~5x fp32. So the candidates (fp32, bf16, int8,
int4: ``elise.model.quant``) are timed on the model's own weight shapes for the row counts that matter
(1: a batch-1 frame, 8: a serving batch, 64: a prompt prefill); each timing is the per-frame (or
per-prefill) sum over the model's matmuls, candidates interleaved, the fastest of the repetitions
kept (other processes only ever add time, and a frame's sum multiplies a decoder matmul's time by
124: a median of 3 let one stalled call inflate a frame 10x on a busy 2-core machine). The timings are
cached per machine (CPU model, torch version, threads, shapes) in ``$ELISE_CACHE_DIR/kernels.json``
(default ``~/.cache/elise``).

The agreement check asks what a TTS user hears: are the codes the same? A candidate decodes a probe
(a prompt, then frames teacher-forced with fp32's codes, so one flip does not derail the rest) and
passes when at least ``MIN_CODE_AGREEMENT`` of its argmax codes (codebook 0 and the 31 depth-decoder
heads) equal fp32's; the logit error is reported beside it. The judge should be a trained model:
random weights give near-flat logits whose argmax flips on any rounding (bf16, the plain rounding
noise floor, agrees on only ~90 % of codes there, against 99.7 % on the trained demo model), so a
bench on random marvis_250m weights times the marvis_250m shapes but judges on a trained model
(``choose_kernels(judge=...)``). Each row-count class (a batch-1 step, a serving batch, a prefill) then
gets the fastest passing candidate (e.g. int4 for 1 row, bf16 for batches, ``quant.RowDispatch``).
The choice, the agreement and the timings are logged and returned.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from elise.generate import FrameGenerator, SamplingConfig
from elise.layout import NUM_CODEBOOKS, segment_rows
from elise.model.csm import CSM
from elise.model.quant import kernel, quantize_plan

log = logging.getLogger(__name__)

CANDIDATES = ("fp32", "bf16", "int8", "int4")
ROWS = {"frame": 1, "batch8": 8, "prefill": 64}  # rows timed per ``ROW_CLASSES`` class (names as logged)
# teacher-forced codes (argmax of the codebook-0 head and of the 31 depth-decoder heads, fed the same
# codes) a candidate must share with fp32 on the probe. Measured on the fitted demo model (672 codes,
# BENCHMARKS.md): bf16, whose only difference from fp32 is rounding, agrees on 99.7 %; int8 99.6 %;
# int4 (min/max groups of 32) 98.75 %. 99 % allows about 4x bf16's rounding flips (near-ties) and
# no more; random weights are no judge (near-flat logits: even bf16 flips ~10 %, see ``Agreement``).
MIN_CODE_AGREEMENT = 0.99
PROBE_FRAMES = 8  # frames of the default probe (256 codes)
GREEDY = SamplingConfig(temperature=1.0, top_k=1)


@dataclass
class Agreement:
    """A candidate against fp32 on the probe: the share of teacher-forced codes equal (what decides)
    and the mean relative error of the logit vectors (reported)."""

    codes_equal: float
    logit_error: float

    @property
    def passed(self) -> bool:
        return self.codes_equal >= MIN_CODE_AGREEMENT

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "rejected"
        return f"codes equal {self.codes_equal:.2%}, logit error {self.logit_error:.4f} ({verdict})"


@dataclass
class Choice:
    """The kept candidate per row-count class, why, and the figures behind it."""

    plan: dict[str, str]  # ROWS name -> kept candidate
    timings: dict[str, dict[str, float]]  # candidate -> ROWS name -> seconds (per frame / per prefill)
    agreement: dict[str, Agreement] = field(default_factory=dict)  # candidate -> probe figures
    cached: bool = False  # timings read from the cache file
    judge: str = "the model itself"  # whose probe decided the agreement
    reason: str = ""

    @property
    def mode(self) -> str:
        """The single kept candidate, or ``frame=int4,batch8=bf16,prefill=bf16`` for a mixed plan."""
        kept = set(self.plan.values())
        return kept.pop() if len(kept) == 1 else ",".join(f"{k}={v}" for k, v in self.plan.items())

    def table(self) -> str:
        """One line per candidate: its timings (the kept ones marked *) and its agreement."""
        lines = []
        for cand, t in self.timings.items():
            cells = ", ".join(
                f"{k} {v * 1e3:.1f} ms{'*' if self.plan.get(k) == cand else ''}" for k, v in t.items()
            )
            check = "" if cand not in self.agreement else f"; {self.agreement[cand]}"
            lines.append(f"{'*' if cand in self.plan.values() else ' '} {cand}: {cells}{check}")
        return "\n".join(lines)


def cache_file() -> Path:
    """``$ELISE_CACHE_DIR/kernels.json``; default ``$XDG_CACHE_HOME/elise`` or ``~/.cache/elise``."""
    root = (
        os.environ.get("ELISE_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "elise"
    )
    return Path(root) / "kernels.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


KEY_VERSION = "v2"  # bump when a candidate's kernels change: older cached timings are not reused


def machine_key(model: CSM, device: torch.device) -> str:
    """What the timings depend on: the processor, torch, threads, the model's matmul shapes and dtype,
    and the candidates' definition (``KEY_VERSION``: v2 = int4 with its sensitive matmuls int8)."""
    cfg = model.cfg
    proc = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    shapes = [(s.dim, s.mlp_hidden, s.num_heads, s.num_kv_heads, s.head_dim, s.num_layers)
              for s in (cfg.backbone, cfg.decoder)]  # fmt: skip
    return (
        f"{proc}|torch {torch.__version__}|{torch.get_num_threads()} threads|{shapes}|{cfg.audio_vocab_size}"
        f"|{next(model.parameters()).dtype}|{KEY_VERSION}"
    )


def slots(model: CSM) -> list[tuple[list[Tensor], int, bool, bool]]:
    """The model's matmuls: (weights, times run per frame, runs in the prefill, sensitive: see
    ``quant.SENSITIVE``), one block per stack."""
    bb, dec = next(model.backbone.blocks()), next(model.decoder.blocks())
    depth = NUM_CODEBOOKS - 1
    out = []
    for block, count, prefill in ((bb, model.cfg.backbone.num_layers, True),
                                  (dec, model.cfg.decoder.num_layers * depth, False)):  # fmt: skip
        attn, mlp = block.self_attn, block.mlp
        for ws in ([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], [attn.o_proj.weight],
                   [mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.down_proj.weight]):  # fmt: skip
            out.append((ws, count, prefill, False))
    out.append(([model.projection.weight], depth, False, True))
    out.append(([model.codebook0_head.weight], 1, False, False))
    out.append(([model.audio_head[0].t()], depth, False, True))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_candidates(
    model: CSM, candidates: tuple[str, ...] = CANDIDATES, reps: int = 3
) -> dict[str, dict[str, float]]:
    """Seconds per frame (``frame``, ``batch8``: all matmuls of one frame at 1 / 8 rows) and per
    64-row prefill (the backbone's matmuls) of each candidate, candidates interleaved, the fastest
    repetition of each matmul (robust to other processes' stalls)."""
    p = next(model.parameters())
    plan = slots(model)
    mats: dict[str, list[Callable[[Tensor], Tensor]]] = {}
    for cand in candidates:
        mats[cand] = [kernel(cand, sensitive)(ws) for ws, _, _, sensitive in plan]
    inputs = {
        name: [torch.randn(rows, ws[0].shape[1], dtype=p.dtype, device=p.device) for ws, *_ in plan]
        for name, rows in ROWS.items()
    }
    times: dict[tuple[str, str, int], list[float]] = {}
    for r in range(reps + 1):  # the first round warms up
        for cand in candidates:
            for name in ROWS:
                for i, (fn, x) in enumerate(zip(mats[cand], inputs[name], strict=True)):
                    if name == "prefill" and not plan[i][2]:
                        continue
                    _sync(p.device)
                    start = time.perf_counter()
                    fn(x)
                    _sync(p.device)
                    if r:
                        times.setdefault((cand, name, i), []).append(time.perf_counter() - start)
    out: dict[str, dict[str, float]] = {}
    for cand in candidates:
        out[cand] = {}
        for name in ROWS:
            total = 0.0
            for i, (_, count, prefill, _) in enumerate(plan):
                if name == "prefill":
                    total += min(times[(cand, name, i)]) if prefill else 0.0
                else:
                    total += count * min(times[(cand, name, i)])
            out[cand][name] = total
    return out


@dataclass
class Probe:
    """What the agreement check decodes: prompt rows [S, 33] (more than 16: int8's prefill path runs),
    then ``frames`` frames teacher-forced with ``codes`` [F, 32] (None: fp32's own greedy frames)."""

    tokens: Tensor
    mask: Tensor
    codes: Tensor | None = None
    frames: int = PROBE_FRAMES


def default_probe(n_text: int = 24, frames: int = PROBE_FRAMES) -> Probe:
    """A fixed byte-text prompt of ``n_text`` rows, then ``frames`` of fp32's greedy frames forced."""
    ids = [1] + [3 + (11 * i) % 250 for i in range(n_text - 2)] + [2]
    tokens, mask = segment_rows(ids, None, eos=False)  # [S, 33]
    return Probe(tokens, mask, None, frames)


@torch.inference_mode()
def teacher_forced(model: CSM, probe: Probe) -> tuple[Tensor, Tensor]:
    """Logits [F, 32, 2048] and argmax codes [F, 32] of the probe's frames through the generation
    steps (``FrameGenerator.decode_frame``), each frame fed ``probe.codes`` within the frame and into
    the backbone (without codes: its own greedy picks, i.e. free-running greedy decoding)."""
    p = next(model.parameters())
    frames = probe.frames if probe.codes is None else probe.codes.shape[0]
    gen = FrameGenerator(model, 1, probe.tokens.shape[0] + frames, GREEDY)
    gen.prefill(probe.tokens[None].to(p.device), probe.mask[None].to(p.device))
    logits, picks = [], []
    for f in range(frames):
        forced = None if probe.codes is None else probe.codes[f : f + 1].to(p.device)  # [1, 32]
        per_codebook: list[Tensor] = []
        codes = gen.decode_frame(gen.hidden, forced=forced, logits=per_codebook)  # [1, 32]
        logits.append(torch.cat(per_codebook))  # [32, 2048]
        picks.append(codes[0])
        if f < frames - 1:
            gen.advance(codes if forced is None else forced)
    return torch.stack(logits), torch.stack(picks)


def agreement(reference: tuple[Tensor, Tensor], got: tuple[Tensor, Tensor]) -> Agreement:
    """Teacher-forced (logits, codes) of a candidate against the reference's on the same probe."""
    (ref_logits, ref_codes), (logits, codes) = reference, got
    rel = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1).clamp(min=1e-12)  # [F, 32]
    return Agreement(float((codes == ref_codes).float().mean()), float(rel.mean()))


def check_candidates(judge: CSM, candidates: list[str], probe: Probe | None = None) -> dict[str, Agreement]:
    """Each candidate's agreement with fp32 on ``judge`` (fused fp32 on entry and on return)."""
    probe = probe or default_probe()
    reference = teacher_forced(judge, probe)
    if probe.codes is None:  # every candidate is fed fp32's greedy frames
        probe = Probe(probe.tokens, probe.mask, reference[1])
    out = {}
    for cand in candidates:
        quantize_plan(judge, {name: cand for name in ROWS})
        out[cand] = agreement(reference, teacher_forced(judge, probe))
    quantize_plan(judge, {name: "fp32" for name in ROWS})
    return out


def read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_cache(path: Path, key: str, timings: dict[str, dict[str, float]]) -> None:
    """Add this machine's timings (a cache that cannot be written is only a warning: timed next load)."""
    data = read_cache(path)
    data[key] = {"timings": timings, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as err:
        log.warning("kernel timings not cached (%s): %s", path, err)


def choose_kernels(
    model: CSM,
    candidates: tuple[str, ...] = CANDIDATES,
    cache: Path | None = None,
    reps: int = 3,
    judge: CSM | None = None,
    probe: Probe | None = None,
) -> Choice:
    """Time ``candidates`` (or read this machine's timings from ``cache``, default ``cache_file()``),
    check the agreement with fp32 of those faster than fp32 somewhere (on ``judge``, a trained model
    of any size, default ``model``; on ``probe``, default ``default_probe()``), then apply to ``model``
    the fastest passing candidate of each row-count class (fp32 always passes). ``model`` and
    ``judge``: fused, eval, gradients off (``prepare_model``). Returns the choice (logged)."""
    p = next(model.parameters())
    path = cache_file() if cache is None else cache
    key = machine_key(model, p.device) + f"|{','.join(candidates)}"
    entry = read_cache(path).get(key)
    cached = entry is not None
    timings = entry["timings"] if entry else time_candidates(model, candidates, reps)
    if not cached:
        write_cache(path, key, timings)
    faster = [c for c in candidates if c != "fp32" and any(timings[c][n] < timings["fp32"][n] for n in ROWS)]
    faster.sort(key=lambda c: timings[c]["frame"])
    checks = check_candidates(judge if judge is not None else model, faster, probe) if faster else {}
    passing = ["fp32", *(c for c in faster if checks[c].passed)]
    plan = {name: min((timings[c][name], c) for c in passing)[1] for name in ROWS}
    quantize_plan(model, plan)
    choice = Choice(
        plan, timings, checks, cached, "the model itself" if judge is None else "a separate judge model"
    )
    fp32 = timings["fp32"]["frame"]
    kept = timings[plan["frame"]]["frame"]
    rejected = [c for c in faster if not checks[c].passed]
    choice.reason = (
        ", ".join(f"{name} {cand}" for name, cand in plan.items())
        + f": {kept * 1e3:.1f} ms of matmuls per batch-1 frame, {fp32 / kept:.2f}x fp32"
        + (f"; rejected by the agreement check: {', '.join(rejected)}" if rejected else "")
        + f" (agreement judged on {choice.judge})"
        + (" (timings cached)" if cached else "")
    )
    log.info("quantize=auto chose %s\n%s", choice.reason, choice.table())
    return choice
