"""Quality evaluation (``python -m elise.evaluate``): intelligibility (WER/CER from a recogniser), voice
match (speaker-embedding similarity), naturalness (a MOS predictor), stopping and speed.

Python entries: ``elise.evaluate.evaluate_checkpoint`` (synthesize and score, returns the eval_report
dict), ``elise.evaluate.evaluate_dialogue`` (the same for conversation scripts, every turn scored),
``elise.evaluate.asr.load_asr`` and ``elise.evaluate.speaker.load_speaker_model``.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "evaluate_checkpoint":  # imported on first use: the backends' modules stay light
        from elise.evaluate.synth import evaluate_checkpoint

        return evaluate_checkpoint
    if name == "evaluate_dialogue":
        from elise.evaluate.dialogue import evaluate_dialogue

        return evaluate_dialogue
    raise AttributeError(f"module 'elise.evaluate' has no attribute {name!r}")
