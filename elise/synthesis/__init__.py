"""The synthesis engine (``Synthesizer``: requests in, audio out) and its parts: text splitting,
prompts, loading, errors. ``elise.synthesize`` (the CLI) writes its results to files."""

from elise.synthesis.engine import Request, Result, Settings, Synthesizer, resolve_speaker
from elise.synthesis.errors import SynthesisError
from elise.synthesis.prompt import Segment, build_prompt, load_references
from elise.synthesis.text import LengthBound, max_frames, split_sentences

__all__ = [
    "LengthBound",
    "Request",
    "Result",
    "Segment",
    "Settings",
    "SynthesisError",
    "Synthesizer",
    "build_prompt",
    "load_references",
    "max_frames",
    "resolve_speaker",
    "split_sentences",
]
