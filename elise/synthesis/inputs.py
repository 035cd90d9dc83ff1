"""What to say and where to write it: texts from ``text``/``text_file``, output wav paths."""

from __future__ import annotations

import time
from pathlib import Path

from elise.rundir import claim_dir
from elise.synthesis.errors import SynthesisError, one_line
from elise.synthesis.text import normalize, read_text_file


def collect_texts(text: object, text_file: object) -> list[str]:
    """The utterances: ``text`` (one) or the non-blank lines of ``text_file`` (not both)."""
    if text is not None and text_file:
        raise SynthesisError("pass text=... or text_file=..., not both")
    if text_file:
        return read_text_file(str(text_file))
    if text is None:
        raise SynthesisError(
            'nothing to say: pass text="..." or text_file=<file with one utterance per line>'
        )
    cleaned = normalize(str(text))
    if not cleaned:
        raise SynthesisError("text is empty")
    return [cleaned]


def default_output_dir() -> Path:
    """A new ``outputs/synth/<time>`` (a same-second run gets ``<time>-2``: ``elise.rundir.claim_dir``)."""
    return claim_dir(Path("outputs") / "synth" / time.strftime("%Y-%m-%d_%H-%M-%S"))


def output_paths(count: int, output: object, output_dir: object, overwrite: bool = False) -> list[Path]:
    """``output`` names the wav of a single utterance; otherwise ``<output_dir>/0001.wav``, ``0002.wav``, ...
    (no ``output_dir``: a new ``outputs/synth/<time>``).

    Every path is checked writable, and not already there unless ``overwrite``, before any model is loaded.
    """
    if output and output_dir:
        raise SynthesisError("pass output=<file.wav> or output_dir=<folder>, not both")
    if output:
        path = Path(str(output)).expanduser()
        if count != 1:
            raise SynthesisError(
                f"output={path} names one file but there are {count} utterances; use output_dir="
            )
        if path.suffix.lower() != ".wav":
            raise SynthesisError(f"output={path} must end in .wav (24 kHz 16-bit PCM wav is written)")
        if path.is_dir():
            raise SynthesisError(f"output={path} is a directory; use output_dir={path}")
        paths = [path]
    else:
        folder = Path(str(output_dir)).expanduser() if output_dir else default_output_dir()
        if folder.exists() and not folder.is_dir():
            raise SynthesisError(f"output_dir={folder} exists and is not a directory")
        paths = [folder / f"{i:04d}.wav" for i in range(1, count + 1)]
    for p in paths:
        if p.exists() and not overwrite:
            raise SynthesisError(f"{p} exists; pass overwrite=true to replace it")
        check_writable(p)
    return paths


def check_writable(path: Path) -> None:
    """Fail early (before loading a model) when ``path`` cannot be created or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        raise SynthesisError(f"cannot write output {path}: {one_line(err)}") from err
