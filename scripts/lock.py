"""Write requirements.lock: the exact installed versions of elise's dependency closure.

    python scripts/lock.py            (make lock)   -> requirements.lock
    python scripts/lock.py --check                  exit 1 when the lock differs from this environment

Walks [project.dependencies] and every extra of pyproject.toml through the installed packages'
own requirements (markers evaluated for this interpreter). moshi is left out: it is installed with
--no-deps (its torch pin is too old), and what its Mimi code imports is in our dependencies.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
SKIP = {"elise", "moshi"}


def closure(requirements: list[str]) -> dict[str, str]:
    """canonical name -> installed version of every package the requirements pull in."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    env = default_environment()
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name in SKIP:
            if name == "elise":  # self-references (dev = elise[report,eval]) bring in those extras
                todo += [Requirement(r) for r in extra_requirements(set(extras))]
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"error: {req.name} is not installed here: run `make install` first")
        found[name] = dist.version.split("+")[0]  # torch 2.13.0+cpu -> 2.13.0 (any build of it)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
                todo.append(sub)
    return found


def extra_requirements(extras: set[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for e in sorted(extras) for r in project["optional-dependencies"].get(e, [])]


def lock_text() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + extra_requirements(set(project["optional-dependencies"]))
    pins = closure(wanted)
    lines = [
        "# Exact versions elise is tested with (dependencies + every extra), written by `make lock`",
        "# (scripts/lock.py) from the environment `make install` built. moshi: installed --no-deps.",
        *(f"{name}=={version}" for name, version in sorted(pins.items())),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with requirements.lock instead")
    args = parser.parse_args()
    text = lock_text()
    if args.check:
        same = LOCK.is_file() and LOCK.read_text() == text
        print("requirements.lock matches this environment" if same else "requirements.lock is stale")
        return 0 if same else 1
    LOCK.write_text(text)
    print(f"wrote {LOCK} ({text.count(chr(10)) - 2} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
