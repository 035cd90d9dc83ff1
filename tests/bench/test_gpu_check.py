"""``make gpu-check`` on a machine without CUDA: one clear line, exit 2, nothing run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu-check would run")
def test_gpu_check_says_there_is_no_cuda(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env={"PY": sys.executable, "OUT": str(out), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gpu-check: no CUDA device here") and "nothing run" in proc.stderr
    assert not out.exists()
