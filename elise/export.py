"""``python -m elise.export ckpt=<elise checkpoint> out=<dir>``: write a transformers "csm" directory.

The result loads with ``CsmForConditionalGeneration.from_pretrained(out)``. A model trained on Mimi
(``mimi`` or the seeded ``mimi_random``) is exported with its Mimi weights (``codec_model.*``) and
the processor files, so the transformers recipe (``AutoProcessor`` + ``generate(...,
output_audio=True)``) gives the audio elise's greedy synthesis gives. ``elise.json`` records the
codec identity and the speaker map. A model trained on another codec (``tiny``) gets no Mimi codec.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from elise.checkpoints import CheckpointError, load_model
from elise.codec import CodecUnavailable
from elise.errors import one_line

MIMI_CODECS = ("mimi", "mimi_random")


class ExportError(RuntimeError):
    """An export that cannot be done as asked (one-line message)."""


def export_checkpoint(
    ckpt: str | Path, out: str | Path, codec_config: dict[str, Any] | None = None, overwrite: bool = False
) -> list[Path]:
    """Export ``ckpt`` (an elise checkpoint or transformers directory) to ``out``; returns the files written.

    Raises:
        ExportError: ``out`` holds files and ``overwrite`` is false; a Mimi ``codec_config`` was given
            for a model trained on another codec.
        CheckpointError, CodecUnavailable: the checkpoint or its Mimi weights cannot be read.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"out={out} exists and is not empty; pass overwrite=true to replace its files")
    loaded = load_model(ckpt)
    codec = loaded.codec
    trained_on = codec["name"] if codec else None
    if codec_config is not None and trained_on is not None and trained_on not in MIMI_CODECS:
        raise ExportError(
            f"the model was trained on codec={trained_on}, not Mimi: refusing to write a Mimi codec_config"
        )
    codec_state = None
    if trained_on in MIMI_CODECS:
        from transformers import MimiConfig

        from elise.codec import build_codec
        from elise.interop import mimi_to_transformers

        mimi = build_codec(trained_on, **dict(codec.get("config") or {}))  # type: ignore[union-attr]
        mimi_config = MimiConfig(**(codec_config or {}))
        codec_state = mimi_to_transformers(mimi.model.state_dict(), mimi_config)
        codec_config = mimi_config.to_dict()
    from elise.interop import export_transformers_dir

    record = {"codec": codec, "speakers": loaded.speakers, "exported_from": str(ckpt)}
    files = export_transformers_dir(loaded.model, loaded.tokenizer, out, codec_config, codec_state, record)
    mode = 0o666 & ~_umask()  # what a plain open() gives: safetensors/tempfiles may write 0600
    for f in files:
        os.chmod(f, mode)
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "ckpt" not in args or "out" not in args:
        print(
            "usage: python -m elise.export ckpt=<checkpoint> out=<dir> [codec_config=<config.json>] [overwrite=true]",
            file=sys.stderr,
        )
        return 2
    try:
        codec_config = None
        if args.get("codec_config"):
            raw = json.loads(Path(args["codec_config"]).read_text())
            codec_config = raw.get("codec_config", raw)
        overwrite = str(args.get("overwrite", "false")).lower() in {"1", "true", "yes"}
        files = export_checkpoint(args["ckpt"], args["out"], codec_config, overwrite)
    except (ExportError, CheckpointError, CodecUnavailable, OSError, json.JSONDecodeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"exported {args['ckpt']} -> {args['out']} ({', '.join(f.name for f in files)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
