"""``python -m elise.export ckpt=<elise checkpoint> out=<dir>``: write a transformers "csm" directory.

The result loads with ``CsmForConditionalGeneration.from_pretrained(out)``. A model trained on Mimi
(``mimi`` or the seeded ``mimi_random``) is exported with its Mimi weights (``codec_model.*``) and
the processor files, so the transformers recipe (``AutoProcessor`` + ``generate(...,
output_audio=True)``) gives the audio elise's greedy synthesis gives. ``elise.json`` records the
codec identity and the speaker map. A model trained on another codec (``tiny``) gets no Mimi codec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from elise.checkpoints import CheckpointError, load_model
from elise.codec import CodecUnavailable
from elise.errors import exit_with

MIMI_CODECS = ("mimi", "mimi_random")


class ExportError(RuntimeError):
    """An export that cannot be done as asked (one-line message)."""


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    codec_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    base: str | Path | None = None,
) -> list[Path]:
    """Export ``ckpt`` (an elise checkpoint or transformers directory) to ``out``; returns the files written.

    A LoRA checkpoint is merged into its base (``base``, else the recorded one): a plain directory.

    Raises:
        ExportError: ``out`` holds files and ``overwrite`` is false; a Mimi ``codec_config`` was given
            for a model trained on another codec.
        CheckpointError, CodecUnavailable: the checkpoint or its Mimi weights cannot be read.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"out={out} exists and is not empty; pass overwrite=true to replace its files")
    loaded = load_model(ckpt, base=base)
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
        codec_state = mimi_to_transformers(mimi.model.state_dict(), mimi_config)  # type: ignore[union-attr]
        codec_config = mimi_config.to_dict()
    from elise.interop import export_transformers_dir

    record = {"codec": codec, "speakers": loaded.speakers, "exported_from": str(ckpt)}
    if "lora" in loaded.meta:  # adapters merged: which base they were merged into
        record["lora_merged_into"] = {k: loaded.meta["lora"][k] for k in ("base", "sha256")}
    return export_transformers_dir(loaded.model, loaded.tokenizer, out, codec_config, codec_state, record)


def main(cfg: DictConfig) -> None:
    """``python -m elise.export ckpt=... out=...`` (elise/conf/export.yaml); user errors exit 2."""
    try:
        codec_config = None
        if cfg.get("codec_config"):
            raw = json.loads(Path(str(cfg.codec_config)).read_text())
            codec_config = raw.get("codec_config", raw)
        files = export_checkpoint(
            str(cfg.ckpt), str(cfg.out), codec_config, bool(cfg.get("overwrite", False)), cfg.get("base")
        )
    except (ExportError, CheckpointError, CodecUnavailable, OSError, json.JSONDecodeError) as e:
        exit_with(e)
    print(f"exported {cfg.ckpt} -> {cfg.out} ({', '.join(f.name for f in files)})")


if __name__ == "__main__":
    from elise.cli import main as cli_main

    cli_main("export")
