"""Score items: per-utterance metrics from the backends, the voice-match matrix, and the summary.

``Scorer(metrics, asr=..., sim=..., mos=...)`` loads only the backends its metrics need; ``score(items,
speaker_ref)`` returns the eval_report dict (``items``, ``summary``, ``voice_match``, ``backends``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from elise.data.audio import read_audio
from elise.evaluate.asr import load_asr
from elise.evaluate.metrics import SECONDS_PER_CHAR, cer, duration_ratio, wer
from elise.evaluate.mos import load_mos
from elise.evaluate.sources import RATE, Item
from elise.evaluate.speaker import load_speaker_model, similarity
from elise.evaluate.stats import mean_interval

log = logging.getLogger("elise.evaluate")

METRICS = ("wer", "cer", "sim", "mos", "eos", "duration_ratio", "rtf")
SUMMARISED = ("wer", "cer", "sim", "mos", "mos_sig", "mos_bak", "duration_ratio", "rtf")
CUT_RATIO, LONG_RATIO = 0.6, 1.8  # duration_ratio flags: a cut below, a tail (or a stall) above
QUIET = 0.1  # an ending is "clean" when its last 100 ms are below this share of the loud frames' level


def ends_in_silence(audio: np.ndarray, sample_rate: int = RATE) -> bool:
    """Whether the last 100 ms are quiet next to the clip's speech (a cut mid-word or trailing noise: False)."""
    frame = sample_rate // 100  # 10 ms frames
    n = audio.size // frame
    if n < 20:
        return False
    rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))  # [n]
    loud = float(np.percentile(rms, 95))
    return loud > 0 and float(rms[-10:].mean()) < QUIET * loud


class Scorer:
    """Per-utterance scoring with the backends ``metrics`` need (see ``METRICS``)."""

    def __init__(self, metrics: Sequence[str] = METRICS, asr: str = "auto", asr_model: str | None = None,
                 sim: str = "auto", sim_model: str | None = None, mos: str = "auto", device: str = "cpu",
                 resamples: int = 2000):  # fmt: skip
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
        self.metrics = set(metrics)
        self.resamples = resamples
        self.asr = load_asr(asr, asr_model, device) if {"wer", "cer"} & self.metrics else None
        self.speaker = load_speaker_model(sim, sim_model, device) if "sim" in self.metrics else None
        self.mos = load_mos(mos) if "mos" in self.metrics else None
        self._embeddings: dict[str, np.ndarray] = {}

    @property
    def backends(self) -> dict[str, Any]:
        return {
            "asr": self.asr.id if self.asr else None,
            "asr_comparable": self.asr.comparable if self.asr else None,
            "speaker": self.speaker.id if self.speaker else None,
            "mos": self.mos.id if self.mos else None,
            "normaliser": "transformers EnglishTextNormalizer (Whisper English, British->American spelling map)",
            "seconds_per_char": SECONDS_PER_CHAR,
        }

    def embedding(self, path: str) -> np.ndarray:
        """Speaker embedding of an audio file (computed once per path)."""
        if path not in self._embeddings:
            assert self.speaker is not None
            self._embeddings[path] = self.speaker.embed(read_audio(path, RATE), RATE)
        return self._embeddings[path]

    def speaker_embedding(self, clips: Sequence[str]) -> np.ndarray:
        """Mean embedding of held-out clips of one voice (``speaker_ref=``)."""
        return np.mean([self.embedding(c) for c in clips], axis=0)

    def score_item(self, item: Item, ref_embedding: np.ndarray | None) -> dict[str, Any]:
        seconds = item.audio.size / RATE
        row: dict[str, Any] = {"id": item.id, "kind": item.kind, "text": item.text, "wav": item.wav,
                               "reference": item.reference, "voice": item.voice, "seconds": round(seconds, 3)}  # fmt: skip
        if item.conversation is not None:
            row.update(conversation=item.conversation, turn=item.turn)
        if self.asr is not None:
            transcript = self.asr.transcribe(item.audio, RATE)
            row["transcript"] = transcript
            if "wer" in self.metrics:
                row["wer"] = wer(item.text, transcript)
            if "cer" in self.metrics:
                row["cer"] = cer(item.text, transcript)
        if self.speaker is not None:
            own = self.speaker.embed(item.audio, RATE)
            row["embedding"] = own
            row["sim"] = similarity(own, ref_embedding) if ref_embedding is not None else None
        if self.mos is not None:
            row.update(self.mos.score(item.audio, RATE))
        if "eos" in self.metrics:
            row["eos"] = item.eos if item.eos is not None else ends_in_silence(item.audio)
        if "duration_ratio" in self.metrics:
            row["duration_ratio"] = duration_ratio(item.text, seconds)
        if "rtf" in self.metrics:
            row["rtf"] = item.rtf
        row["flags"] = flags(row)
        return row

    def score(self, items: Sequence[Item], speaker_ref: Sequence[str] | None = None,
              progress: bool = False) -> dict[str, Any]:  # fmt: skip
        """The eval_report dict of ``items`` (SIM against each item's reference, else ``speaker_ref``);
        ``progress``: a ``score`` bar (scoring takes longer than synthesizing on CPU)."""
        from tqdm import tqdm

        global_ref = self.speaker_embedding(speaker_ref) if self.speaker and speaker_ref else None
        rows = []
        for item in tqdm(items, desc="score", unit="utt", disable=not progress):
            ref = self.embedding(item.reference) if self.speaker and item.reference else global_ref
            rows.append(self.score_item(item, ref))
        voice_match = self.voice_match(rows)
        for row in rows:
            row.pop("embedding", None)
        return {"items": rows, "summary": summarise(rows, self.resamples), "voice_match": voice_match,
                "backends": self.backends}  # fmt: skip

    def voice_match(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """With outputs of two or more reference voices (``voice`` set: checkpoint mode with a list of
        reference clips): SIM of every output against every voice's reference, and the share of outputs
        whose own reference scores highest."""
        voiced = [r for r in rows if r.get("voice") is not None and r.get("reference")]
        by_voice: dict[int, str] = {}
        for r in voiced:
            by_voice.setdefault(r["voice"], r["reference"])
        if self.speaker is None or len(by_voice) < 2:
            return None
        order = sorted(by_voice)
        ref_emb = [self.embedding(by_voice[v]) for v in order]
        sims = np.array([[similarity(r["embedding"], e) for e in ref_emb] for r in voiced])  # [items, voices]
        own = np.array([order.index(r["voice"]) for r in voiced])  # [items]
        matched = sims.argmax(axis=1) == own
        for r, m in zip(voiced, matched, strict=True):
            r["matched"] = bool(m)
        matrix = [[float(sims[own == v, j].mean()) for j in range(len(order))] for v in range(len(order))]
        return {"references": [by_voice[v] for v in order], "matrix": matrix,
                "matched_share": float(matched.mean()), "n": int(matched.size)}  # fmt: skip


def flags(row: dict[str, Any]) -> list[str]:
    """Problems a listener would hear: ``cut`` (no end-of-speech, or far too short), ``long`` (a tail or a
    stall), ``empty`` (nothing recognised)."""
    out = []
    ratio = row.get("duration_ratio")
    if row.get("eos") is False or (ratio is not None and ratio < CUT_RATIO):
        out.append("cut")
    if ratio is not None and ratio > LONG_RATIO:
        out.append("long")
    if "transcript" in row and not row["transcript"].strip():
        out.append("empty")
    return out


def summarise(rows: list[dict[str, Any]], resamples: int = 2000) -> dict[str, Any]:
    """Each metric's mean with its 95 % bootstrap interval, plus counts."""
    summary: dict[str, Any] = {}
    for key in SUMMARISED:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            summary[key] = mean_interval(values, resamples)
    eos = [r["eos"] for r in rows if r.get("eos") is not None]
    if eos:
        summary["eos_rate"] = mean_interval([float(e) for e in eos], resamples)
    summary["counts"] = {
        "items": len(rows),
        "cut": sum("cut" in r["flags"] for r in rows),
        "long": sum("long" in r["flags"] for r in rows),
        "empty_transcript": sum("empty" in r["flags"] for r in rows),
        "seconds": round(sum(r["seconds"] for r in rows), 2),
    }
    return summary
