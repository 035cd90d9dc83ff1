"""``data=folder data.root=<dir>``: a folder of recordings -> clips, texts and provenance in a manifest.

Every audio file under ``root`` (wav, flac, ogg, mp3; m4a where a decoder can read it) becomes clips:
- a sidecar transcript (``<name>.txt`` or ``<name>.lab`` beside the file) wins: a file of at most
  ``max_clip`` seconds is one clip with that text; a longer one is cut at its longest pauses, one
  sentence (or line, when the sidecar has several lines) per clip;
- otherwise the recording is cut at pauses found by silero-vad into ``min_clip``..``max_clip`` s
  clips and each clip is transcribed by the ASR named by ``transcribe`` (``elise.evaluate.asr``).

The clips go to ``<out_dir>/clips/`` (24 kHz 16-bit wav) and one line per clip to
``<out_dir>/manifest.jsonl`` in ``data=manifest``'s layout (``audio``, ``text``, ``id``) plus where
it came from (``source``, ``start``, ``end`` in seconds, ``transcript``: sidecar or the ASR's id).
The user may correct texts or delete lines there: a rerun keeps the lines of every file already
cut (same bytes, sidecar and cut settings; a copy with new file times counts as the same) and only
cuts new or changed files, whose lines are replaced;
``clips/`` keeps only the clips the manifest names.
Files that give no clip (unreadable, no speech, a sidecar that cannot be split) and pieces too short
to merge are returned as items with an error, so preparation's report counts them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from elise.config import conf_defaults
from elise.data.audio import TARGET_SR, AudioError, read_audio, resample, to_mono, write_wav
from elise.data.sources import AUDIO_SUFFIXES, RawItem, read_manifest
from elise.data.vad import VAD_RATE, Piece, clip_bounds, plan_clips, plan_text_clips, speech_spans
from elise.errors import one_line

FOLDER_SUFFIXES = (*AUDIO_SUFFIXES, ".m4a")  # libsndfile reads AUDIO_SUFFIXES; the others need audioread
SIDECAR_SUFFIXES = (".txt", ".lab")
TRANSCRIBERS = ("auto", "whisper", "pocketsphinx", "none")
MANIFEST = "manifest.jsonl"
STATE = "state.json"  # per source file: fingerprint and skips (what a rerun need not redo)


def out_dir(cfg: Mapping[str, Any]) -> Path:
    """``data.out_dir``, or ``<root>_clips`` beside the recordings folder."""
    if cfg.get("out_dir"):
        return Path(str(cfg["out_dir"])).expanduser()
    root = Path(str(cfg["root"])).expanduser().resolve()
    return root.parent / f"{root.name}_clips"


def read_folder(cfg: Mapping[str, Any], asr: Any = None) -> list[RawItem]:
    """Cut and transcribe the new recordings under ``cfg["root"]``; the manifest's items + skipped files.

    Settings missing from ``cfg`` are those of ``conf/data/folder.yaml``. ``asr`` (an object with
    ``.transcribe(audio, sample_rate) -> str`` and ``.id``) replaces the one ``cfg["transcribe"]``
    names; that one is loaded only when a clip needs it.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no audio files under it, or a bad option.
    """
    cfg = {**conf_defaults("data/folder"), **{k: v for k, v in cfg.items() if v is not None}}
    if not cfg.get("root"):
        raise ValueError("data.source=folder needs data.root=<folder of recordings>")
    root = Path(str(cfg["root"])).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"recordings folder not found: data.root={root}")
    out = out_dir(cfg)
    files = scan(root, out)
    if not files:
        raise ValueError(f"no audio files ({', '.join(FOLDER_SUFFIXES)}) under data.root={root}")
    cutter = _Cutter(cfg, out, asr)
    out.mkdir(parents=True, exist_ok=True)
    # one process cuts; the others (prepare slices, DDP ranks) wait, then find every recording done
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        items = _update(cfg, root, out, files, cutter)
    speaker = cfg.get("speaker")
    for item in items:
        if item.speaker is None and item.error is None and speaker is not None:
            item.speaker = str(speaker)
    return items


def _update(
    cfg: Mapping[str, Any], root: Path, out: Path, files: list[Path], cutter: _Cutter
) -> list[RawItem]:
    """Cut the new or changed recordings, rewrite the manifest; its items + the skipped pieces."""
    state = _read_json(out / STATE).get("files", {})
    rows = _read_rows(out / MANIFEST)
    by_source: dict[str | None, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row.get("source"), []).append(row)
    new_state: dict[str, dict] = {}
    kept_rows = [r for r in rows if r.get("source") is None]  # lines the user added by hand
    stems = _clip_stems([f.relative_to(root) for f in files])
    start, cut_files, cut_clips = time.perf_counter(), 0, 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        key, stat = cutter.fingerprint(path), _stat(path)
        done = state.get(rel, {})
        if done.get("key") == key and (done.get("stat") == stat or done.get("sha") == _sha(path, stat)):
            new_state[rel] = {**done, "stat": stat}  # a copy with new times but the same bytes is done
            kept_rows += by_source.get(rel, [])
            continue
        _remove_clips(out, by_source.get(rel, []))
        file_rows, skipped = cutter.cut(path, rel, stems[rel])
        kept_rows += file_rows
        sha = _sha(path, stat)
        new_state[rel] = {"key": key, "stat": stat, "sha": sha, "clips": len(file_rows), "skipped": skipped}
        cut_files, cut_clips = cut_files + 1, cut_clips + len(file_rows)
        _write_rows(out / MANIFEST, kept_rows + _rows_after(rel, files, root, by_source, new_state))
        _write_json(out / STATE, {"version": 1, "files": {**state, **new_state}})
    _write_rows(out / MANIFEST, kept_rows)
    _remove_orphans(out, kept_rows)  # clips of recordings gone from the folder or of deleted lines
    _write_json(out / STATE, {"version": 1, "files": new_state})
    seconds = time.perf_counter() - start
    skipped_n = sum(len(s["skipped"]) for s in new_state.values())
    rate = f" ({cut_clips / seconds:.1f} clips/s)" if cut_clips and seconds > 0 else ""
    print(
        f"folder {root}: {len(files)} recordings ({cut_files} cut now{rate}, {len(files) - cut_files} "
        f"done before), {len(kept_rows)} clips, {skipped_n} skipped; manifest (correct texts there, "
        f"then rerun): {out / MANIFEST}"
    )
    items = read_manifest(out / MANIFEST) if kept_rows else []
    for rel, done in new_state.items():
        for where, reason, detail in done["skipped"]:
            items.append(
                RawItem(where, "", None, None, (reason, detail if where == rel else f"{rel}: {detail}"))
            )
    return items


def scan(root: Path, out: Path) -> list[Path]:
    """Audio files under ``root`` (recursive, sorted), not in hidden folders or in ``out``."""
    out = out.resolve()
    found = []
    for path in sorted(root.rglob("*")):
        rel_parts = path.relative_to(root).parts
        if path.suffix.lower() not in FOLDER_SUFFIXES or any(p.startswith(".") for p in rel_parts):
            continue
        if path.is_file() and not path.resolve().is_relative_to(out):
            found.append(path)
    return found


def sidecar_text(path: Path) -> str | None:
    """The non-empty transcript in ``<name>.txt`` / ``<name>.lab`` beside ``path``, if any."""
    for suffix in SIDECAR_SUFFIXES:
        side = path.with_suffix(suffix)
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text
    return None


def text_units(text: str) -> list[str]:
    """A sidecar's lines when it has several, else its sentences (split after . ! ?)."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def decode(path: Path) -> np.ndarray:
    """Mono float32 [N] at 24 kHz: soundfile for wav/flac/ogg/mp3, audioread (ffmpeg/GStreamer) else.

    Raises:
        AudioError: nothing here can decode it (the message says what to install).
    """
    try:
        return read_audio(path)
    except AudioError:
        if path.suffix.lower() in AUDIO_SUFFIXES:
            raise
    return _decode_audioread(path)


def _decode_audioread(path: Path) -> np.ndarray:
    no_decoder = AudioError(
        f"no decoder for {path.suffix} here: libsndfile cannot read it and audioread finds no ffmpeg or "
        "GStreamer; install ffmpeg, or convert the file to wav/flac"
    )
    try:
        import audioread
    except ImportError as err:
        raise no_decoder from err
    try:
        with audioread.audio_open(str(path)) as f:
            sr, channels = int(f.samplerate), int(f.channels)
            pcm = np.frombuffer(b"".join(f), dtype="<i2")
    except audioread.NoBackendError as err:
        raise no_decoder from err
    except Exception as err:  # backends raise their own types (DecodeError, OSError, ...)
        raise AudioError(f"cannot decode audio: {one_line(err)}") from err
    wav = pcm.astype(np.float32).reshape(-1, channels) / 32768.0  # [N, C]
    return resample(to_mono(wav), sr)


class _Cutter:
    """Cuts one recording into clips and texts, with the settings of ``cfg``."""

    def __init__(self, cfg: Mapping[str, Any], out: Path, asr: Any):
        self.cfg, self.out, self._asr = cfg, out, asr
        self.min_clip, self.max_clip = float(cfg["min_clip"]), float(cfg["max_clip"])
        self.pad, self.min_pause = float(cfg["pad"]), float(cfg["min_pause"])
        self.threshold = float(cfg["vad_threshold"])
        self.transcribe = str(cfg["transcribe"])
        if self.transcribe not in TRANSCRIBERS:
            raise ValueError(
                f"data.transcribe must be one of {', '.join(TRANSCRIBERS)}, got {self.transcribe!r}"
            )
        if not 0 < self.min_clip < self.max_clip:
            raise ValueError(
                f"need 0 < data.min_clip < data.max_clip, got {self.min_clip} and {self.max_clip}"
            )
        if not 0 <= 2 * self.pad < self.max_clip:
            raise ValueError(
                f"need 0 <= 2 * data.pad < data.max_clip, got pad {self.pad}, max_clip {self.max_clip}"
            )

    def fingerprint(self, path: Path) -> str:
        """Changes when the file's sidecar or a setting that shapes its clips changes."""
        side = sidecar_text(path)
        parts: dict[str, Any] = {"sidecar": side}
        parts.update(cut=[self.min_clip, self.max_clip, self.min_pause, self.pad, self.threshold])
        if side is None:  # only clips without a sidecar depend on the recogniser
            parts.update(transcribe=self.transcribe, asr_model=self.cfg.get("asr_model"))
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def asr(self) -> Any:
        if self._asr is None and self.transcribe != "none":
            import torch

            from elise.evaluate.asr import load_asr

            device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._asr = load_asr(backend=self.transcribe, model=self.cfg.get("asr_model"), device=device)
            except RuntimeError as err:  # the backend's package or weights cannot be loaded
                raise ValueError(f"data.transcribe={self.transcribe}: {one_line(err)}") from err
        return self._asr

    def cut(self, path: Path, rel: str, stem: str) -> tuple[list[dict], list[list[str]]]:
        """(manifest rows, skips ``[where, reason, detail]``) of one recording; its clips written."""
        try:
            wav = decode(path)  # [N] 24 kHz
        except (AudioError, OSError) as err:
            return [], [[rel, "unreadable_audio", one_line(err)]]
        total = len(wav) / TARGET_SR
        if total == 0:
            return [], [[rel, "empty_audio", "0 samples"]]
        side = sidecar_text(path)
        if side is not None and total <= self.max_clip:
            return [self._row(wav, rel, f"{stem}_000", (0.0, total), side, "sidecar")], []
        wav16 = resample(wav, TARGET_SR, VAD_RATE)  # [N'] for the VAD and the ASR
        spans = speech_spans(wav16, self.threshold, self.min_pause, self.max_clip - 2 * self.pad)
        if not spans:
            return [], [[rel, "no_speech", f"the voice activity detector found no speech in {total:.1f} s"]]
        skipped: list[list[str]] = []
        if side is not None:
            units = text_units(side)
            text_pieces = plan_text_clips(spans, units, self.min_clip, self.max_clip, self.pad)
            if text_pieces is None:
                detail = (
                    f"{total:.1f} s with {len(units)} sentence(s)/line(s) in its sidecar and {len(spans)} "
                    f"speech span(s): no cut at pauses gives one sentence per clip of <= {self.max_clip:g} s; "
                    "give it one line per clip, or cut the recording"
                )
                return [], [[rel, "sidecar_unaligned", detail]]
            pieces: list[Piece] = text_pieces
        else:
            pieces, short = plan_clips(spans, self.min_clip, self.max_clip, self.pad)
            for p in short:
                start, end = clip_bounds(spans, p, total, self.pad)
                detail = f"{start:.2f}-{end:.2f} s: speech between long pauses shorter than data.min_clip"
                skipped.append([f"{rel}@{start:.2f}", "too_short", detail])
        rows = []
        for k, piece in enumerate(pieces):
            bounds = clip_bounds(spans, piece, total, self.pad)
            if side is not None:
                text, source = " ".join(piece.texts), "sidecar"
            else:
                text, source = self._transcribe(wav16, bounds)
            rows.append(self._row(wav, rel, f"{stem}_{k:03d}", bounds, text, source))
        return rows, skipped

    def _transcribe(self, wav16: np.ndarray, bounds: tuple[float, float]) -> tuple[str, str]:
        asr = self.asr()
        if asr is None:
            return "", "none"
        clip = wav16[int(bounds[0] * VAD_RATE) : int(bounds[1] * VAD_RATE)]  # [n] 16 kHz
        return " ".join(str(asr.transcribe(clip, VAD_RATE)).split()), str(asr.id)

    def _row(
        self, wav: np.ndarray, rel: str, clip_id: str, bounds: tuple[float, float], text: str, source: str
    ) -> dict:
        audio = f"clips/{clip_id}.wav"
        write_wav(self.out / audio, wav[int(bounds[0] * TARGET_SR) : int(bounds[1] * TARGET_SR)])
        start, end = round(bounds[0], 3), round(bounds[1], 3)
        return {"audio": audio, "text": text, "id": clip_id, "source": rel, "start": start, "end": end,
                "transcript": source}  # fmt: skip


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _sha(path: Path, stat: list[int]) -> str:
    """The file's size and content hash (read only when its size and time are not those recorded)."""
    with open(path, "rb") as f:
        return f"{stat[0]}:{hashlib.file_digest(f, 'sha256').hexdigest()}"


def _clip_stems(rels: list[Path]) -> dict[str, str]:
    """Recording -> clip name prefix: its path without suffix (with the suffix when two files share it)."""
    plain = [r.with_suffix("").as_posix() for r in rels]
    return {
        r.as_posix(): p if plain.count(p) == 1 else f"{p}_{r.suffix[1:]}"
        for r, p in zip(rels, plain, strict=True)
    }


def _rows_after(rel: str, files: list[Path], root: Path, by_source: dict, done: dict) -> list[dict]:
    """Rows of recordings not visited yet, so a manifest written mid-run loses none of them."""
    later = [f.relative_to(root).as_posix() for f in files]
    later = later[later.index(rel) + 1 :]
    return [row for r in later if r not in done for row in by_source.get(r, [])]


def _remove_clips(out: Path, rows: list[dict]) -> None:
    clips = (out / "clips").resolve()
    for row in rows:
        path = (out / str(row.get("audio", ""))).resolve()
        if path.is_relative_to(clips) and path.is_file():
            path.unlink()


def _remove_orphans(out: Path, rows: list[dict]) -> None:
    clips = out / "clips"
    used = {(out / str(r.get("audio", ""))).resolve() for r in rows}
    for path in clips.rglob("*.wav") if clips.is_dir() else []:
        if path.resolve() not in used:
            path.unlink()


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            raise ValueError(f"{path} line {n}: {one_line(err)}; fix or delete that line") from err
        rows.append(row)
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
