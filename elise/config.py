"""One way to compose the Hydra configuration from Python (tests, CLIs that are not @hydra.main),
and the one place code reads default settings from: the yaml files of ``elise/conf``."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

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


def group_options(group: str) -> list[str]:
    """The option names of a config group: ``group_options("model")`` -> ``["csm_1b", ...]``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _load_group_file(group_path: str) -> DictConfig:
    """``conf/<group_path>.yaml`` with its same-group ``defaults:`` entries merged in (Hydra's order)."""
    path = CONF_DIR / f"{group_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {group_path!r} (no file {path})")
    node = OmegaConf.load(path)
    assert isinstance(node, DictConfig)
    entries = list(node.pop("defaults", []) or [])
    if "_self_" not in entries:
        entries.append("_self_")
    group = group_path.rsplit("/", 1)[0] if "/" in group_path else ""
    merged: DictConfig | ListConfig = OmegaConf.create({})
    for entry in entries:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
        elif isinstance(entry, str) and not entry.startswith("override "):
            merged = OmegaConf.merge(merged, _load_group_file(f"{group}/{entry}" if group else entry))
    assert isinstance(merged, DictConfig)
    return merged


@cache
def _conf_defaults(group_path: str) -> dict[str, Any]:
    node = _load_group_file(group_path)
    root = OmegaConf.create({"paths": _load_group_file("paths/default"), "node": node})
    out = OmegaConf.to_container(root.node, resolve=True, throw_on_missing=False)
    assert isinstance(out, dict)
    return {str(k): (None if v == "???" else v) for k, v in out.items()}


def conf_defaults(group_path: str) -> dict[str, Any]:
    """The settings of one group option as a plain dict: ``conf_defaults("optim/adamw")``.

    The yaml files are the single source of defaults: code that fills in missing settings
    (optimizer, data preparation, datamodule, loss, codecs, model presets) reads them here.
    ``${paths.*}`` resolves against ``paths/default``; a required value (``???``) comes back as None.
    """
    return copy.deepcopy(_conf_defaults(group_path))


# Lightning's spellings of the precisions elise trains in; the weights always stay fp32.
PRECISIONS = {
    "32": "32-true",
    "32-true": "32-true",
    "64": "64-true",
    "64-true": "64-true",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "16-mixed",
    "16-mixed": "16-mixed",
}


def trainer_precision(value: Any) -> str:
    """``trainer.precision`` in Lightning's canonical spelling (32 -> 32-true, bf16 -> bf16-mixed,
    16 -> 16-mixed; null -> 32-true; ``auto`` stays, resolved by ``elise.precision`` once the model is
    known). 16-bit weights without an fp32 copy are refused (ValueError)."""
    spelled = "32-true" if value is None else str(value).strip().lower()
    if spelled == "auto":
        return spelled
    if spelled in ("bf16-true", "16-true", "half"):
        raise ValueError(
            f"trainer.precision={spelled} stores the weights in 16 bits (no fp32 master copy): "
            "use bf16-mixed or 16-mixed"
        )
    if spelled not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={value}: choose one of auto, {', '.join(sorted(set(PRECISIONS.values())))}"
        )
    return PRECISIONS[spelled]
