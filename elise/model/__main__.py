"""``python -m elise.model model=<preset>``: a parameter table; the last line is one JSON object."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from elise.config import to_dict
from elise.model import build_model


def main(cfg: DictConfig) -> None:
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
    from elise.cli import main as cli_main

    cli_main("model_info")
