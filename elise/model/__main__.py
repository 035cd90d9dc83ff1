"""``python -m elise.model model=<preset>``: a parameter table; the last line is one JSON object."""

from __future__ import annotations

import json
import sys

from elise.config import compose, to_dict
from elise.model import build_model


def main(argv: list[str]) -> None:
    cfg = compose("train", [a for a in argv if a.startswith("model")] or ["model=tiny"])
    model_cfg = to_dict(cfg.model)
    import torch

    with torch.device("meta"):  # counts need no memory
        model = build_model(model_cfg)
    counts = model.num_params()
    name = model_cfg.get("name", "?")
    print(f"model {name}")
    for part, n in counts.items():
        print(f"  {part:<18} {n:>15,d}  ({n / 1e6:8.1f}M)")
    print(json.dumps({"model": name, **counts}))


if __name__ == "__main__":
    main(sys.argv[1:])
