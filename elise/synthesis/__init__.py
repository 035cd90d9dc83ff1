"""Synthesis pieces behind ``synthesize.py``: text splitting, prompts, batched/streamed generation,
wav writing, errors. ``elise.synthesize.run(cfg)`` puts them together."""

from elise.synthesis.engine import Job, Result, Settings, Synthesizer
from elise.synthesis.errors import SynthesisError
from elise.synthesis.prompt import Segment, build_prompt, load_references
from elise.synthesis.text import LengthBound, max_frames, split_sentences
from elise.synthesis.wav import WavWriter

__all__ = [
    "Job",
    "LengthBound",
    "Result",
    "Segment",
    "Settings",
    "SynthesisError",
    "Synthesizer",
    "WavWriter",
    "build_prompt",
    "load_references",
    "max_frames",
    "split_sentences",
]
