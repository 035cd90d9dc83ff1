"""Per-machine matmul choice for synthesis (``quantize=auto``): the fastest weight format that agrees
with fp32.

CPUs differ: on the AMD EPYC (Zen 4) dev box int8 and int4 weight-only kernels read weights fastest at
batch 1, on an Intel Xeon with AMX bf16 products run ~5x fp32. So the candidates (fp32, bf16, int8,
int4: ``elise.model.quant``) are timed on the model's own weight shapes for the row counts that matter
(1: a batch-1 frame, 8: a serving batch, 64: a prompt prefill); each timing is the per-frame (or
per-prefill) sum over the model's matmuls, candidates interleaved and medians kept. The timings are
cached per machine (CPU model, torch version, threads, shapes) in ``$ELISE_CACHE_DIR/kernels.json``
(default ``~/.cache/elise``). Candidates are then tried fastest first at batch 1: a candidate is kept
when its logits on a fixed probe (a text prompt, then one teacher-forced frame: the prefill and the
single-row steps) are within ``MAX_REL_ERROR`` of the unquantized model's. The choice and the timings
are logged and returned.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from elise.generate import FrameGenerator, SamplingConfig
from elise.layout import CODEBOOK_SIZE, NUM_CODEBOOKS, segment_rows
from elise.model.csm import CSM
from elise.model.quant import MATMULS, dequantize, quantize

log = logging.getLogger(__name__)

CANDIDATES = ("fp32", "bf16", "int8", "int4")
ROWS = {"frame": 1, "batch8": 8, "prefill": 64}  # the row counts timed (names as logged)
# mean relative error of the probe's logit vectors a candidate may have against the unquantized model
# (measured on the trained demo model: bf16 0.0023, int8 0.0037, int4 0.035)
MAX_REL_ERROR = 0.01
GREEDY = SamplingConfig(temperature=1.0, top_k=1)
Matmul = Callable[[Tensor], Tensor]


@dataclass
class Choice:
    """The kept candidate, why, and the figures behind it."""

    mode: str  # one of CANDIDATES
    timings: dict[str, dict[str, float]]  # candidate -> ROWS name -> seconds (per frame / per prefill)
    errors: dict[str, float] = field(default_factory=dict)  # candidate -> probe mean relative error
    cached: bool = False  # timings read from the cache file
    reason: str = ""

    def table(self) -> str:
        """One line per candidate: its timings and agreement, the kept one marked."""
        lines = []
        for cand, t in self.timings.items():
            cells = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items())
            err = self.errors.get(cand)
            check = (
                ""
                if err is None
                else f"; probe error {err:.4f} ({'ok' if err <= MAX_REL_ERROR else 'rejected'})"
            )
            lines.append(f"{'*' if cand == self.mode else ' '} {cand}: {cells}{check}")
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


def machine_key(model: CSM, device: torch.device) -> str:
    """What the timings depend on: the processor, torch, threads, and the model's matmul shapes."""
    cfg = model.cfg
    proc = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    shapes = [(s.dim, s.mlp_hidden, s.num_heads, s.num_kv_heads, s.head_dim, s.num_layers)
              for s in (cfg.backbone, cfg.decoder)]  # fmt: skip
    return (
        f"{proc}|torch {torch.__version__}|{torch.get_num_threads()} threads|{shapes}|{cfg.audio_vocab_size}"
    )


def fp32_matmul(weights: list[Tensor]) -> Matmul:
    """The unquantized path: fused [K, N] for several weights (``FusedMatmul``), else ``F.linear``."""
    if len(weights) > 1:
        wt = torch.cat([w.detach() for w in weights]).t().contiguous()  # [K, N]
        return lambda x: x @ wt
    w = weights[0].detach()
    return lambda x: F.linear(x, w)


def slots(model: CSM) -> list[tuple[list[Tensor], int, bool]]:
    """The model's matmuls: (weights, times run per frame, runs in the prefill), one block per stack."""
    bb, dec = next(model.backbone.blocks()), next(model.decoder.blocks())
    depth = NUM_CODEBOOKS - 1
    out = []
    for block, count, prefill in ((bb, model.cfg.backbone.num_layers, True),
                                  (dec, model.cfg.decoder.num_layers * depth, False)):  # fmt: skip
        attn, mlp = block.self_attn, block.mlp
        for ws in ([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], [attn.o_proj.weight],
                   [mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.down_proj.weight]):  # fmt: skip
            out.append((ws, count, prefill))
    out.append(([model.projection.weight], depth, False))
    out.append(([model.codebook0_head.weight], 1, False))
    out.append(([model.audio_head[0].t()], depth, False))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_candidates(
    model: CSM, candidates: tuple[str, ...] = CANDIDATES, reps: int = 3
) -> dict[str, dict[str, float]]:
    """Seconds per frame (``frame``, ``batch8``: all matmuls of one frame at 1 / 8 rows) and per
    64-row prefill (the backbone's matmuls) of each candidate, candidates interleaved, medians."""
    p = next(model.parameters())
    plan = slots(model)
    mats: dict[str, list[Matmul]] = {}
    for cand in candidates:
        make = fp32_matmul if cand == "fp32" else MATMULS[cand]
        mats[cand] = [make(ws) for ws, _, _ in plan]
    inputs = {
        name: [torch.randn(rows, ws[0].shape[1], dtype=p.dtype, device=p.device) for ws, _, _ in plan]
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
            for i, (_, count, prefill) in enumerate(plan):
                if name == "prefill":
                    total += statistics.median(times[(cand, name, i)]) if prefill else 0.0
                else:
                    total += count * statistics.median(times[(cand, name, i)])
            out[cand][name] = total
    return out


def probe_prompt(n_text: int = 16) -> tuple[Tensor, Tensor]:
    ids = [1] + [3 + (11 * i) % 250 for i in range(n_text - 2)] + [2]
    return segment_rows(ids, None, eos=False)  # [S, 33]


@torch.no_grad()
def probe(model: CSM, codes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Logits [32, 2048] of one frame after a fixed text prompt, and its codes [32]: greedy, or
    teacher-forced with ``codes`` (so a candidate is compared on the reference's decisions)."""
    p = next(model.parameters())
    tokens, mask = (t.to(p.device) for t in probe_prompt())
    gen = FrameGenerator(model, 1, tokens.shape[0] + 1, GREEDY)
    gen.prefill(tokens[None], mask[None])
    h, cache = gen.hidden, gen.decoder_cache
    logits = [model.codebook0_logits(h)[0, :CODEBOOK_SIZE].float()]
    picked = [logits[0].argmax() if codes is None else codes[0]]
    cache.reset()
    out = model.decoder(
        model.project(torch.stack([h, model.audio_embeddings(picked[0].view(1))], 1)), cache=cache
    )
    for k in range(1, NUM_CODEBOOKS):
        logits.append(model.codebook_logits(out[:, -1], k)[0, :CODEBOOK_SIZE].float())
        picked.append(logits[k].argmax() if codes is None else codes[k])
        if k < NUM_CODEBOOKS - 1:
            e = model.audio_embeddings((picked[k] + gen.offsets[k]).view(1))  # [1, Db]
            out = model.decoder(model.project(e[:, None]), cache=cache)
    return torch.stack(logits), torch.stack(picked)


def probe_error(reference: Tensor, logits: Tensor) -> float:
    """Mean relative error of the logit vectors [32, V]."""
    return float(((logits - reference).norm(dim=-1) / reference.norm(dim=-1).clamp(min=1e-12)).mean())


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
    model: CSM, candidates: tuple[str, ...] = CANDIDATES, cache: Path | None = None, reps: int = 3
) -> Choice:
    """Time ``candidates`` (or read this machine's timings from ``cache``, default ``cache_file()``),
    then apply the fastest at batch 1 whose probe logits agree with the unquantized model (fp32 always
    agrees). ``model``: fused, eval, gradients off (``prepare_model``). Returns the choice (logged)."""
    p = next(model.parameters())
    path = cache_file() if cache is None else cache
    key = machine_key(model, p.device) + f"|{','.join(candidates)}"
    entry = read_cache(path).get(key)
    cached = entry is not None
    timings = entry["timings"] if entry else time_candidates(model, candidates, reps)
    if not cached:
        write_cache(path, key, timings)
    order = sorted(candidates, key=lambda c: timings[c]["frame"])
    reference, codes = probe(model)
    choice = Choice("fp32", timings, cached=cached)
    for cand in order:
        if cand == "fp32":
            break
        quantize(model, cand)
        choice.errors[cand] = probe_error(reference, probe(model, codes)[0])
        if choice.errors[cand] <= MAX_REL_ERROR:
            choice.mode = cand
            break
        dequantize(model).fuse()
    fp32 = timings["fp32"]["frame"]
    kept = timings[choice.mode]["frame"]
    rejected = [c for c in order[: order.index(choice.mode)]]
    choice.reason = (
        f"{choice.mode}: {kept * 1e3:.1f} ms of matmuls per frame, {fp32 / kept:.2f}x fp32"
        + (f"; faster but rejected by the agreement check: {', '.join(rejected)}" if rejected else "")
        + (" (timings cached)" if cached else "")
    )
    log.info("quantize=auto chose %s\n%s", choice.reason, choice.table())
    return choice
