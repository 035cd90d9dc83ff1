"""The install story: pins in environment.yml agree with pyproject.toml; moshi's runtime needs are pinned."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;]+)\s*", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = pins(project["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda = pins(pip_section)
    assert conda, "environment.yml pins nothing"
    for name, version in conda.items():
        assert py.get(name) == version, f"{name}: environment.yml {version} != pyproject {py.get(name)}"
    assert py["torch"] == "2.13.0"


def test_moshi_runtime_needs_are_pinned():
    """moshi is installed --no-deps: what its Mimi code imports must be in our dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = pins(project["dependencies"])
    for need in ("einops", "sentencepiece", "safetensors", "huggingface-hub", "numpy", "sphn"):
        assert need in py, need
    assert "moshi==" in (ROOT / "Makefile").read_text()
    import moshi.models.loaders  # noqa: F401  (imports cleanly with those alone)
