"""Naturalness predictors: ``load_mos(backend) -> MOSModel`` whose ``score`` gives ``mos`` (overall) and
its parts.

Backends:
- ``dnsmos``: Microsoft's DNSMOS P.835 (SIG speech, BAK background, OVRL overall, 1-5) with the ONNX
  models the speechmos package carries (offline). It was trained on noisy human speech: it rates
  noise and distortion, not prosody, and a clean robotic voice still scores around 3.
- ``none``: no MOS.
UTMOS is not offered: no installable package carries its weights, and the hub is not reachable here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from elise.evaluate.backends import BackendUnavailable, package_version, to_16k

BACKENDS = ("auto", "dnsmos", "none")


class MOSModel(Protocol):
    id: str

    def score(self, audio: np.ndarray, sample_rate: int) -> dict[str, float]: ...


class DNSMOS:
    """DNSMOS P.835 on 9 s windows (shorter clips are repeated to fill one, as DNSMOS does)."""

    def __init__(self) -> None:
        try:
            import speechmos
            from speechmos.dnsmos import DNSMOS as Model
        except ImportError as err:
            raise BackendUnavailable(
                f"mos=dnsmos needs speechmos (pip install 'elise[eval]'): {err}"
            ) from err
        models = Path(speechmos.__file__).parent / "dnsmos_models"
        self.model = Model(str(models / "sig_bak_ovr.onnx"), str(models / "model_v8.onnx"))
        self.id = f"dnsmos p835 (speechmos {package_version('speechmos')})"

    def score(self, audio: np.ndarray, sample_rate: int) -> dict[str, float]:
        wav = to_16k(audio, sample_rate)
        if wav.size == 0:
            return {"mos": 1.0, "mos_sig": 1.0, "mos_bak": 1.0}
        out = self.model(wav, 16_000, False)
        return {
            "mos": float(out["ovrl_mos"]),
            "mos_sig": float(out["sig_mos"]),
            "mos_bak": float(out["bak_mos"]),
        }


def load_mos(backend: str = "auto") -> MOSModel | None:
    """A MOS predictor by backend name (``BACKENDS``); ``none``: None."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"mos={backend}: no such backend; choose one of: {', '.join(BACKENDS)}")
    return None if backend == "none" else DNSMOS()
