"""``python -m elise.export ckpt=<elise checkpoint> out=<dir>``: write a transformers "csm" directory.

The result loads with ``CsmForConditionalGeneration.from_pretrained(out)`` (codec weights are not
part of an elise checkpoint: transformers initialises its Mimi from the default Mimi config unless
``codec_config=<config.json of a Mimi/CSM model>`` is given).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from elise.checkpoints import CheckpointError, load_model
from elise.errors import one_line
from elise.interop import export_transformers_dir


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "ckpt" not in args or "out" not in args:
        print(
            "usage: python -m elise.export ckpt=<checkpoint> out=<dir> [codec_config=<config.json>]",
            file=sys.stderr,
        )
        return 2
    try:
        loaded = load_model(args["ckpt"])
        codec_config = None
        if args.get("codec_config"):
            raw = json.loads(Path(args["codec_config"]).read_text())
            codec_config = raw.get("codec_config", raw)
        out = export_transformers_dir(loaded.model, loaded.tokenizer, args["out"], codec_config)
    except (CheckpointError, OSError, json.JSONDecodeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"exported {args['ckpt']} -> {out} (config.json, model.safetensors, tokenizer.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
