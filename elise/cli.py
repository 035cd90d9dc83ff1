"""One argument style for every command: Hydra ``key=value`` overrides of ``elise/conf/<command>.yaml``.

``main(command)`` is what ``train.py``, ``synthesize.py`` and ``python -m elise.prepare``,
``elise.export``, ``elise.report``, ``elise.model``, ``elise.bench`` call. Before Hydra sees the command line:

- ``--help`` prints the command's own keys with the one-line meanings written in the yaml files;
- free text and path values (``text=``, ``ckpt=``, ``output=``...) are quoted for Hydra's grammar
  (``quote_verbatim``), so any sentence or file name reaches the command exactly as typed;
- every override is checked against the composed config: a misspelled key is one line with the
  closest valid key ("unknown key 'tex'; did you mean 'text'?"), a ``+key`` inside elise's own
  sections must exist, a wrong group option lists the valid ones. All exit 2, no traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from elise.config import CONF_DIR, compose
from elise.errors import exit_with
from elise.rundir import claim_dir

# Keys whose values are free text or file paths: they never go through Hydra's value grammar.
VERBATIM_KEYS = frozenset(
    {
        "text", "reference_text", "text_file", "reference_audio", "output", "output_dir", "ckpt",
        "ckpt_path", "init_from", "out", "codec_config", "run_dir", "metrics_out", "data.path",
        "data.root", "data.out_dir", "data.asr_model", "codec.weights", "hydra.run.dir", "voices_dir", "api_key", "base",
        "dialogue", "dialogue_file", "voices", "audio", "eval_set", "asr.model", "sim.model",
    }
)  # fmt: skip
TEXT_KEYS = frozenset({"text", "reference_text"})  # "null" typed here is a sentence, not None
# Sections holding Lightning's or Hydra's keyword arguments: ``+key`` may add what our yaml omits.
OPEN_SECTIONS = ("trainer", "callbacks", "logger", "hydra")
# Config groups that are plumbing, not options a user picks: left out of --help.
HIDDEN_GROUPS = ("hydra", "paths", "local")
ARGV_READY = "ELISE_ARGV_QUOTED"  # environment flag: sys.argv already went through verbatim_args
_ABSENT = object()  # OmegaConf.select default: tells a missing key from a null one
# Short spellings users type, per command: ``python train.py precision=bf16-mixed`` is trainer.precision.
ALIASES = {"train": {"precision": "trainer.precision"}}


def quote_verbatim(value: str) -> str:
    """``value`` as a single-quoted Hydra string whose composed value is ``value`` exactly.

    Hydra un-escapes backslashes only before a quote (inside) or the closing quote; OmegaConf reads
    ``${`` as an interpolation and ``\\${`` as a literal ``${`` (backslashes before it escape each other).
    """
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)  # literal ${, not interpolation
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # quotes, and the backslashes before
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)  # backslashes before the closing quote
    return f"'{value}'"


def aliased_args(command: str, argv: list[str]) -> list[str]:
    """``argv`` with the aliases of ``command`` (``ALIASES``) spelled as their real keys."""
    aliases = ALIASES.get(command, {})
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        plus = key[: len(key) - len(key.lstrip("+"))]
        name = key.lstrip("+")
        out.append(f"{plus}{aliases[name]}={value}" if eq and name in aliases else arg)
    return out


def verbatim_args(argv: list[str]) -> list[str]:
    """``argv`` with the values of ``VERBATIM_KEYS`` quoted for Hydra (``quote_verbatim``).

    ``reference_audio=[a.wav,b.wav]`` / ``reference_text=[...]`` lists and ``voices={...}`` stay as
    they are; ``null`` stays None for path keys.
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        name = key.lstrip("+")
        if eq and name in VERBATIM_KEYS:
            is_list = name.startswith("reference_") and value.startswith("[") and value.endswith("]")
            is_dict = name == "voices" and value.startswith("{")  # voices={alice: {...}}; a folder is a path
            keep_null = value == "null" and name not in TEXT_KEYS
            if not (is_list or is_dict or keep_null):
                arg = f"{key}={quote_verbatim(value)}"
        out.append(arg)
    return out


# ---- checking overrides -------------------------------------------------------------------------


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg`` (sections and leaves), ``hydra`` left out."""
    keys = []
    for key in cfg:
        full = f"{prefix}{key!s}"
        if full == "hydra":
            continue
        keys.append(full)
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            keys += config_keys(node, f"{full}.")
    return keys


def unknown_key(key: str, cfg: DictConfig) -> str:
    """One line for a key that is not in the config, naming the closest valid one."""
    close = difflib.get_close_matches(key, config_keys(cfg), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else " (see --help for the keys)"
    return f"unknown key '{key}'{hint}"


def _is_group(name: str) -> bool:
    return (CONF_DIR / name).is_dir()


def _group_of(message: str) -> str | None:
    found = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if not found:
        return None
    group, option = found.groups()
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return f"{group}={option}: no such {group}; choose one of: {', '.join(options)}"


def check_overrides(config_name: str, argv: list[str]) -> DictConfig:
    """Compose ``config_name`` with ``argv`` (Hydra's own flags left out) as Hydra will, and turn
    every problem into one line and exit 2. Returns the composed config with its ``hydra`` node
    (sweep overrides left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            [override] = parser.parse_overrides([arg])
        except HydraException as err:
            exit_with(f"cannot read '{arg}': {' '.join(str(err).split())}")
        parsed.append((override, arg))
    for override, _ in parsed:
        key = override.key_or_group
        if override.is_add() and key.split(".")[0] not in OPEN_SECTIONS and not _is_group(key):
            base = compose(config_name, _group_args(parsed))
            if OmegaConf.select(base, key, default=_ABSENT) is _ABSENT:
                exit_with(f"{unknown_key(key, base)} ('+key' only adds to {', '.join(OPEN_SECTIONS)})")
    plain = [(o, a) for o, a in parsed if not o.is_sweep_override()]
    sweeps = [(o, a) for o, a in parsed if o.is_sweep_override()]
    try:
        cfg = compose(config_name, [arg for _, arg in plain], return_hydra_config=True)
    except HydraException as err:
        message = str(err)
        missing = re.search(r"Could not override '([^']+)'", message)
        if missing:
            base = compose(config_name, _group_args(plain))
            if OmegaConf.select(base, missing.group(1), default=_ABSENT) is _ABSENT:
                exit_with(unknown_key(missing.group(1), base))
        already = re.search(r"An item is already at '([^']+)'", message)
        if already:
            key = already.group(1)
            exit_with(f"'{key}' is already a key: write {key}=... without the '+'")
        exit_with(_group_of(message) or " ".join(message.split()))
    except Exception as err:  # noqa: BLE001 - a value OmegaConf refuses (type, interpolation): one line
        exit_with(err)
    for override, _ in sweeps:
        key = override.key_or_group
        if not _is_group(key) and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            exit_with(unknown_key(key, cfg))
    return cfg


def _group_args(plain: list[tuple[Any, str]]) -> list[str]:
    """The group choices among the overrides (``model=tiny``): the key list they give."""
    return [arg for override, arg in plain if _is_group(override.key_or_group.lstrip("+"))]


# ---- --help -------------------------------------------------------------------------------------


def yaml_comments(path: Path) -> dict[str, str]:
    """{dotted key: its one-line meaning} from a yaml file: the comment after the value, else the
    comment line just above the key."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above = ""  # the comment line just above a key (the one closest to it)
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("-"):
            above = ""
            continue
        if stripped.startswith("#"):
            above = stripped.lstrip("#").strip()
            continue
        found = re.match(r"(\s*)([A-Za-z_][\w.]*)\s*:(.*)$", line)
        if not found:
            continue
        indent, key, rest = len(found.group(1)), found.group(2), found.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([k for _, k in stack] + [key])
        inline = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        if inline or above:
            comments[full] = inline or above
        if not rest.split(" #", 1)[0].strip():
            stack.append((indent, key))
        above = ""
    return comments


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        out = []
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none() and len(child):
                out += _leaves(child, f"{prefix}{key!s}.")
            else:
                out.append((f"{prefix}{key!s}", child._value() if child is not None else None))
        return out
    return [(prefix.rstrip("."), node._value())]


def help_text(config_name: str, prog: str) -> str:
    """The command's keys (with defaults and meanings) and its groups (with their options)."""
    cfg = compose(config_name, return_hydra_config=True)
    all_choices = cfg.hydra.runtime.choices
    choices = {k: v for k, v in all_choices.items() if not k.startswith(HIDDEN_GROUPS)}
    main_file = CONF_DIR / f"{config_name}.yaml"
    header = [line.lstrip("#").strip() for line in main_file.read_text().splitlines() if line.startswith("#")]
    lines = [f"usage: {prog} [key=value ...]   (config: elise/conf/{config_name}.yaml)"]
    lines += [f"  {h}" for h in header if h]
    comments = yaml_comments(main_file)
    own = [k for k in cfg if k != "hydra" and k not in all_choices]
    lines.append("\nkeys:")
    after_keys = len(lines)
    for key in own:
        for name, value in _leaves(cfg._get_node(key), f"{key!s}."):
            lines.append(_help_line(name, value, comments.get(name, "")))
    if len(lines) == after_keys:
        lines.pop()
    lines.append("")
    for group, option in choices.items():
        files = sorted((CONF_DIR / group).glob("*.yaml"), key=lambda p: p.stem != option)
        options = " | ".join(p.stem for p in sorted(files))
        lines.append(f"{group}=<{options}>   (now: {option or 'none'})")
        if group in ("experiment", "debug", "hparams_search", "callbacks", "logger") or group not in cfg:
            continue
        meaning: dict[str, str] = {}
        for path in reversed(files + [CONF_DIR / group / "default.yaml"]):
            if path.is_file():
                meaning.update(yaml_comments(path))
        for name, value in _leaves(cfg._get_node(group), f"{group}."):
            if not name.endswith("._target_"):
                lines.append(_help_line(name, value, meaning.get(name.split(".", 1)[1], "")))
    if "text" in cfg:
        lines.append("\nAny sentence or path is taken as typed: text=Don't stop, output=take (2).wav")
    return "\n".join(lines)


def _help_line(name: str, value: Any, meaning: str) -> str:
    shown = "null" if value is None else str(value)
    if len(shown) > 30:
        shown = shown[:27] + "..."
    return f"  {name}={shown:<{max(1, 40 - len(name))}} {meaning}".rstrip()


# ---- the entry ----------------------------------------------------------------------------------


def claim_run_dir(config_name: str, argv: list[str], cfg: DictConfig | None = None) -> list[str]:
    """``argv`` plus ``hydra.run.dir=<a new dir>`` (``hydra.sweep.dir`` with ``-m``) when the config's
    dir is time-stamped and the user named none: created here with a plain mkdir, so two runs started
    in the same second get ``<time>`` and ``<time>-2`` instead of sharing one. ``cfg``: ``argv``
    composed with its ``hydra`` node already (``check_overrides``'), else composed here."""
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(argv) else "hydra.run.dir"
    if any(a.lstrip("+").startswith(f"{key}=") for a in argv):
        return argv
    if cfg is None or "hydra" not in cfg:
        cfg = compose(config_name, [a for a in argv if not a.startswith("-")], return_hydra_config=True)
    section, name = key.split(".")[1:]
    if "${now:" not in str(cfg.hydra[section]._get_node(name)._value()):
        return argv
    run_dir = claim_dir(Path(str(OmegaConf.select(cfg, key))))
    return [*argv, f"{key}={quote_verbatim(str(run_dir))}"]


# command: (config name, "module:function" given the composed config, how a user types it)
COMMANDS = {
    "train": ("train", "elise.train:main", "python train.py"),
    "synthesize": ("synthesize", "elise.synthesize:main", "python synthesize.py"),
    "serve": ("serve", "elise.serve.app:main", "python serve.py"),
    "prepare": ("prepare", "elise.prepare:main", "python -m elise.prepare"),
    "export": ("export", "elise.export:main", "python -m elise.export"),
    "report": ("report", "elise.report:main", "python -m elise.report"),
    "model_info": ("model_info", "elise.model.__main__:main", "python -m elise.model"),
    "bench": ("bench", "elise.bench.__main__:main", "python -m elise.bench"),
    "evaluate": ("evaluate", "elise.evaluate.run:main", "python -m elise.evaluate"),
}


def main(command: str, argv: list[str] | None = None) -> Any:
    """Run ``command`` (a key of ``COMMANDS``) on ``argv`` (default ``sys.argv[1:]``) under Hydra."""
    import importlib

    import hydra

    config_name, target, prog = COMMANDS[command]
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(config_name, prog))
        raise SystemExit(0)
    if not os.environ.get(ARGV_READY):  # set: a DDP rank re-run by Lightning with our argv below
        argv = verbatim_args(aliased_args(command, argv))
    cfg = check_overrides(config_name, argv)
    if command == "train":
        from elise.preflight import UserError, preflight

        try:
            preflight(cfg)
        except UserError as err:
            exit_with(err)
    argv = claim_run_dir(config_name, argv, cfg)  # the config composed once before Hydra's own
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv.append(f"hydra.job.name={config_name}")  # train.log, not cli.log
    module, function = target.split(":")
    task = getattr(importlib.import_module(module), function)  # after the checks: errors stay fast

    def elise_task(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except MissingMandatoryValue as err:  # a required key (``???``) not given: one line
            exit_with(err)

    # Lightning's DDP launcher re-runs sys.argv for the other ranks: argv[0] stays the real script, and
    # ARGV_READY tells those runs that the values are quoted already
    sys.argv = [sys.argv[0] if sys.argv and sys.argv[0] else prog, *argv]
    os.environ[ARGV_READY] = "1"
    try:
        return hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(
            elise_task
        )()
    finally:
        os.environ.pop(ARGV_READY, None)
