"""The install story: dependency ranges + a lock that `make install` and environment.yml use, only
imported packages as direct dependencies, and a built wheel that works outside the checkout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# what each direct dependency is imported as; runtime-only ones say why they are here
IMPORTED_AS = {"hydra-core": "hydra", "huggingface-hub": "huggingface_hub", "pyyaml": "yaml"}
RUNTIME_ONLY = {
    "wandb": "the default logger (logger/wandb.yaml), imported by Lightning",
    "einops": "moshi's Mimi code (moshi is installed --no-deps)",
    "sentencepiece": "moshi's Mimi code",
    "sphn": "moshi's Mimi code",
}


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_dependencies_are_ranges_not_pins():
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        assert not any(s.operator == "==" for s in req.specifier), line
        assert any(s.operator == "<" for s in req.specifier), f"{line}: no upper bound"


def test_every_direct_dependency_is_imported_by_elise():
    source = "\n".join(p.read_text() for p in (ROOT / "elise").rglob("*.py"))
    for name in names(PROJECT["dependencies"]):
        if name in RUNTIME_ONLY:
            continue
        module = IMPORTED_AS.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{name} is never imported"
    assert not {"tqdm", "pyarrow", "matplotlib"} & names(PROJECT["dependencies"])
    serve = names(PROJECT["optional-dependencies"]["serve"])  # python serve.py (elise.serve)
    assert serve == {"fastapi", "uvicorn", "python-multipart", "prometheus-client"}
    assert names(PROJECT["optional-dependencies"]["report"]) == {"matplotlib"}


def test_moshi_runtime_needs_are_dependencies():
    """moshi is installed --no-deps: what its Mimi code imports must be in our dependencies."""
    deps = names(PROJECT["dependencies"])
    for need in ("einops", "sentencepiece", "safetensors", "huggingface-hub", "numpy", "sphn"):
        assert need in deps, need
    import moshi.models.loaders  # noqa: F401  (imports cleanly with those alone)


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_make_install_and_environment_use_the_lock():
    make = (ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in make and "-r requirements.lock" in make
    assert "--no-deps $(MOSHI)" in make and "MOSHI := moshi==" in make
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert {"torch==2.13.0", "-r requirements.lock", "-e ."} <= set(pip)
    pins = lock()
    assert pins["torch"] == "2.13.0" and "transformers" in pins and "pytest" in pins  # `make test` needs
    assert "moshi" not in pins and "elise" not in pins


def test_lock_is_the_environment_the_tests_run_in():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_report_without_matplotlib_is_a_one_line_hint(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from elise.report import main

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(OmegaConf.create({"run_dir": str(tmp_path), "out": None}))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'elise[report]'" in err


@pytest.mark.slow
def test_built_wheel_works_outside_the_checkout(tmp_path):
    """Build the wheel, install it (no deps: this environment has them) into a folder, and run the
    model table, data preparation and synthesis from a folder that holds no checkout."""
    src = tmp_path / "src"
    skip = (
        ".git",
        ".venv",
        ".cache",
        "outputs",
        "multirun",
        "build",
        "*.egg-info",
        "__pycache__",
        "demo_out",
    )
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))  # the wheel builds in-tree
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], check=True
    )
    wheel = next((tmp_path / "dist").glob("elise-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "ELISE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    where = run("-c", "import elise, elise.config as c; print(elise.__file__); print(c.CONF_DIR)")
    assert all(line.startswith(str(site)) for line in where.split()), where
    table = json.loads(run("-m", "elise.model", "model=tiny").strip().splitlines()[-1])
    assert table["model"] == "tiny"
    run("-m", "elise.prepare", "data=sample", "codec=tiny", "tokenizer=bytes")
    assert (work / "cache" / "codes" / "prepare_report.json").is_file()
    from testkit import save_tiny

    ckpt = save_tiny(tmp_path / "tiny.ckpt")
    wav = work / "hello.wav"
    run(
        "-c",
        "import sys; from elise.cli import main; main('synthesize', sys.argv[1:])",  # = synthesize.py
        f"ckpt={ckpt}",
        "codec=tiny",
        "text=Hello there.",
        f"output={wav}",
        "max_audio_seconds=0.4",
        "device=cpu",
        "seed=0",
    )
    assert wav.is_file() and wav.stat().st_size > 44
