"""``python synthesize.py ckpt=path/to/last.ckpt text="Hello there."`` (options: elise/conf/synthesize.yaml).

Text arguments are quoted for Hydra here, so commas, apostrophes and ``=`` in
``text=...``/``reference_text=...`` need no extra shell quoting. A user error (missing or corrupt
checkpoint, empty text, unreadable reference audio, unwritable output) prints one line on stderr and
exits with code 2.
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from elise.checkpoints import CheckpointError
from elise.codec import CodecUnavailable
from elise.errors import exit_with
from elise.synthesis.errors import SynthesisError

USER_ERRORS = (SynthesisError, CheckpointError, CodecUnavailable, OSError)
TEXT_KEYS = ("text=", "reference_text=")


def quote_text_args(argv: list[str]) -> list[str]:
    """Wrap free text values in Hydra quotes (a comma would otherwise start a sweep, a quote a string).

    Values already quoted, and lists (``reference_text=[...]``), are left as they are.
    """
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg.startswith(TEXT_KEYS) and value and value[0] not in "'\"[":
            value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # escape quotes
            value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)  # a trailing backslash
            value = value.replace("${", "\\${")  # literal text, not an OmegaConf interpolation
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


@hydra.main(config_path="elise/conf", config_name="synthesize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from elise.synthesize import run

    try:
        run(cfg)
    except USER_ERRORS as err:
        exit_with(err)


if __name__ == "__main__":
    sys.argv = sys.argv[:1] + quote_text_args(sys.argv[1:])
    main()
