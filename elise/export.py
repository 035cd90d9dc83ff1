"""``python -m elise.export ckpt=<elise checkpoint> out=<dir>``: write a transformers "csm" directory.

The result loads with ``CsmForConditionalGeneration.from_pretrained(out)`` (codec weights are not
part of an elise checkpoint: transformers initialises its Mimi from the default Mimi config unless
``codec_config=<config.json of a Mimi/CSM model>`` is given).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from elise.checkpoints import CheckpointError, load_model
from elise.errors import exit_with
from elise.interop import export_transformers_dir


def main(cfg: DictConfig) -> None:
    """``python -m elise.export ckpt=... out=...`` (elise/conf/export.yaml); user errors exit 2."""
    args = {"ckpt": cfg.ckpt, "out": cfg.out, "codec_config": cfg.get("codec_config")}
    try:
        loaded = load_model(args["ckpt"])
        codec_config = None
        if args.get("codec_config"):
            raw = json.loads(Path(args["codec_config"]).read_text())
            codec_config = raw.get("codec_config", raw)
        out = export_transformers_dir(loaded.model, loaded.tokenizer, args["out"], codec_config)
    except (CheckpointError, OSError, json.JSONDecodeError) as e:
        exit_with(e)
    print(f"exported {args['ckpt']} -> {out} (config.json, model.safetensors, tokenizer.json)")


if __name__ == "__main__":
    from elise.cli import main as cli_main

    cli_main("export")
