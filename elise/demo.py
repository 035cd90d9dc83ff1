"""``python -m elise.demo``: train the tiny model on the bundled clips (experiment=demo), write the
report, then synthesize a sentence from the final checkpoint. Offline, a few minutes on 2 CPU cores.

``out=<dir>`` names the run dir (default ``demo_out/<time>``, must be new or empty); every other
``key=value`` is an override of the training config, checked like ``python train.py`` checks it
(e.g. ``python -m elise.demo out=demo_out/short trainer.max_steps=50``).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

SENTENCE = "Hello from the elise demo."


HELP = """usage: python -m elise.demo [out=<dir>] [key=value ...]
  Train the tiny model on the bundled clips (experiment=demo), write the report, synthesize a sentence.

keys:
  out=null                                 run dir (null: demo_out/<time>); must be new or empty

Every other key=value is a key of the training config: see python train.py --help."""


def demo_args(argv: list[str]) -> tuple[Path, list[str]]:
    """(run dir, training overrides) from ``argv``; the overrides are checked against the training
    config with ``experiment=demo`` (a misspelled key is one line, exit 2)."""
    from elise.cli import aliased_args, check_overrides, verbatim_args
    from elise.errors import exit_with

    out = None
    overrides = []
    for arg in argv:
        if arg.startswith("out="):
            out = arg.removeprefix("out=")
        else:
            overrides.append(arg)
    if out in ("", "null"):
        out = None
    overrides = verbatim_args(aliased_args("train", overrides))
    check_overrides("train", ["experiment=demo", *overrides])
    run_dir = Path(out or f"demo_out/{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        exit_with(f"out={run_dir} is not empty; pick a fresh out=<dir>")
    return run_dir, overrides


def train_demo(run_dir: Path, overrides: list[str]) -> tuple[Path, dict[str, float], float]:
    """Train ``experiment=demo`` into ``run_dir``; returns (final checkpoint, metrics, seconds)."""
    from elise.cli import quote_verbatim
    from elise.config import compose
    from elise.train import train

    run_dir_arg = f"hydra.run.dir={quote_verbatim(str(run_dir))}"
    cfg = compose("train", ["experiment=demo", run_dir_arg, *overrides], return_hydra_config=True)
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return ckpt, metrics, seconds


def synthesize_demo(ckpt: Path, out: Path) -> Path:
    """Synthesize ``SENTENCE`` from ``ckpt`` with the codec it was trained on (tiny: noise, not speech)."""
    from elise.cli import verbatim_args
    from elise.config import compose
    from elise.synthesize import run

    args = verbatim_args([f"ckpt={ckpt}", f"text={SENTENCE}", f"output={out}", "seed=0", "device=cpu"])
    run(compose("synthesize", args, return_hydra_config=False))
    return out


CODEC_NOTES = {
    "tiny": "tiny codec: a smoke test, not speech",
    "mimi_random": "Mimi with seeded random weights: noise, not speech",
}


def codec_note(ckpt: Path) -> str:
    """What the demo's wav is, from the codec ``ckpt`` records (the one synthesis used)."""
    from elise.checkpoints import torch_load_checked

    codec = (torch_load_checked(ckpt, mmap=True).get("hyper_parameters") or {}).get("codec") or {}
    name = str(codec.get("name", "unknown"))
    return CODEC_NOTES.get(name, f"codec {name}")


def first_last(run_dir: Path, key: str = "train/loss") -> tuple[float, float] | None:
    from elise.report import read_metrics

    points = read_metrics(run_dir / "metrics.csv").get(key)
    return (points[0][1], points[-1][1]) if points else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(HELP)
        return 0
    run_dir, overrides = demo_args(argv)
    run_dir.mkdir(parents=True, exist_ok=True)

    from elise.errors import one_line
    from elise.train import user_error_types

    try:
        ckpt, _, seconds = train_demo(run_dir, overrides)
    except user_error_types() as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    from elise.report import write_report

    try:
        report: object = write_report(run_dir)
    except ImportError as err:  # matplotlib is the `report` extra
        report = f"(skipped: {err})"
    loss = first_last(run_dir)
    wav = synthesize_demo(ckpt, run_dir / "demo.wav")

    print(f"\ntrained in {seconds:.0f} s; run dir: {run_dir}")
    if loss:
        print(f"train/loss: {loss[0]:.2f} at the first step -> {loss[1]:.2f} at the last")
    print(f"checkpoint: {ckpt}")
    print(f"metrics:    {run_dir / 'metrics.csv'}")
    print(f"report:     {report}")
    print(f"samples:    {run_dir / 'samples'}")
    print(f"synthesized '{SENTENCE}' -> {wav}  ({codec_note(ckpt)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
