"""One way to compose the Hydra configuration from Python (tests, CLIs that are not @hydra.main)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose(
    config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)


def to_dict(node: DictConfig) -> dict[str, Any]:
    """A config group as a plain, resolved dict (``OmegaConf.to_container`` typed for keyword use)."""
    out = OmegaConf.to_container(node, resolve=True)
    if not isinstance(out, dict):  # a DictConfig always gives a dict; guards against a ListConfig
        raise TypeError(f"expected a mapping config node, got {type(out).__name__}")
    return {str(k): v for k, v in out.items()}
