"""Generate the bundled sample set elise/assets/sample/ with espeak-ng (run once; outputs are committed).

    apt-get install -y espeak-ng
    python scripts/make_sample_data.py [--out elise/assets/sample]

Writes ``metadata.csv`` (``id|text``, LJSpeech style) and ``wavs/<id>.flac`` (24 kHz mono 16-bit).
The voice is espeak-ng's synthetic English voice, not Elise's. Inline tags such as ``<laughs>``
stay in the transcript (as in the Elise dataset) but are not spoken: espeak has no laugh, so the
clip only carries the words around the tag.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elise.data.audio import TARGET_SR, read_audio, write_wav  # noqa: E402

SENTENCES = [
    "Hello there, how are you today?",
    "The weather is lovely this morning.",
    "I can't believe you did that! <laughs>",
    "Please pass me the salt and pepper.",
    "We walked along the river until sunset.",
    "<sighs> It has been a very long week.",
    "Do you want to go to the cinema tonight?",
    "Seven cats sat quietly on the warm roof.",
    "Oh, that is such a wonderful surprise!",
    "Turn left at the second traffic light.",
    "She reads a new book every single week.",
    "Well, <laughs> that did not go as planned.",
    "The train leaves at half past nine.",
    "Could you speak a little more slowly, please?",
    "Thank you so much for your help.",
    "Good night, and sleep well.",
]
SPEED_WPM = 165
MIN_S, MAX_S = 1.5, 4.0


def synthesize(text: str, voice: str) -> np.ndarray:
    """Speak ``text`` (tags removed) with espeak-ng; mono float32 at 24 kHz, edges trimmed."""
    spoken = " ".join(re.sub(r"<[^>]*>", " ", text).split())
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(SPEED_WPM), "-w", str(raw), spoken], check=True)
        wav = read_audio(raw)  # [N] at 24 kHz
    loud = np.flatnonzero(np.abs(wav) > 1e-3)
    pad = int(0.1 * TARGET_SR)  # keep 100 ms of silence at each end
    wav = wav[max(0, loud[0] - pad) : loud[-1] + pad]
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)  # peak -6 dBFS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "elise/assets/sample"
    )
    parser.add_argument("--voice", default="en-us")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng not found: apt-get install -y espeak-ng")
    wavs = args.out / "wavs"
    shutil.rmtree(wavs, ignore_errors=True)
    wavs.mkdir(parents=True)
    lines = []
    for i, text in enumerate(SENTENCES):
        clip_id = f"sample_{i:03d}"
        wav = synthesize(text, args.voice)
        seconds = len(wav) / TARGET_SR
        if not MIN_S <= seconds <= MAX_S:
            sys.exit(f"{clip_id}: {seconds:.2f} s outside [{MIN_S}, {MAX_S}]: edit the sentence")
        write_wav(wavs / f"{clip_id}.flac", wav)
        lines.append(f"{clip_id}|{text}")
        print(f"{clip_id} {seconds:.2f} s  {text}")
    (args.out / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in wavs.iterdir())
    print(f"{len(lines)} clips, {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
