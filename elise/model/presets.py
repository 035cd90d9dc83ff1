"""Size presets: the files of ``elise/conf/model`` (the one place sizes are written), as CSMConfigs.

``preset("marvis_250m")`` is what ``model=marvis_250m`` composes; ``tiny`` (golden test), ``test`` (the
test suite's runs) and ``demo`` (experiment=demo) are the small sizes.
"""

from __future__ import annotations

from elise.config import conf_defaults, group_options
from elise.model.config import CSMConfig

PRESETS: tuple[str, ...] = tuple(group_options("model"))


def preset(name: str) -> CSMConfig:
    """The CSMConfig of ``conf/model/<name>.yaml``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")
    return CSMConfig.from_dict(conf_defaults(f"model/{name}"))
