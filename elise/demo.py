"""``python -m elise.demo``: train the tiny model on the bundled clips (experiment=demo), write the
report, then synthesize a sentence from the final checkpoint. Offline, a few minutes on 2 CPU cores.

Extra ``key=value`` arguments are Hydra overrides of the training config
(e.g. ``python -m elise.demo trainer.max_steps=50``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from datetime import datetime
from pathlib import Path

SENTENCE = "Hello from the elise demo."


def train_demo(run_dir: Path, overrides: list[str]) -> tuple[Path, dict[str, float], float]:
    """Train ``experiment=demo`` into ``run_dir``; returns (final checkpoint, metrics, seconds)."""
    from elise.config import compose
    from elise.train import train

    cfg = compose(
        "train", ["experiment=demo", f"hydra.run.dir={run_dir}", *overrides], return_hydra_config=True
    )
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return ckpt, metrics, seconds


def synthesize_demo(ckpt: Path, out: Path) -> Path | None:
    """Synthesize ``SENTENCE`` with ``elise.synthesize.run`` when that module exists."""
    if importlib.util.find_spec("elise.synthesize") is None:
        return None
    import elise.synthesize as synth

    if not hasattr(synth, "run"):
        return None
    from elise.config import compose

    cfg = compose(
        "synthesize",
        [f"ckpt={ckpt}", f"text={SENTENCE}", f"output={out}", "codec=tiny", "seed=0", "device=cpu"],
        return_hydra_config=False,
    )
    synth.run(cfg)
    return out


def first_last(run_dir: Path, key: str = "train/loss") -> tuple[float, float] | None:
    from elise.report import read_metrics

    points = read_metrics(run_dir / "metrics.csv").get(key)
    return (points[0][1], points[-1][1]) if points else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elise.demo", description=__doc__)
    parser.add_argument("--out", default=None, help="run dir (default: demo_out/<time>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = parser.parse_args(argv)
    run_dir = Path(args.out or f"demo_out/{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        print(f"error: {run_dir} is not empty; pick a fresh --out", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)

    from elise.errors import one_line
    from elise.train import user_error_types

    try:
        ckpt, _, seconds = train_demo(run_dir, args.overrides)
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
    if wav is not None:
        print(f"synthesized '{SENTENCE}' -> {wav}  (tiny codec: a smoke test, not speech)")
    else:
        print("elise.synthesize is not available: skipped synthesis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
