"""A new folder for every run: ``claim_dir`` creates ``<base>``, else ``<base>-2``, ``-3``... atomically
(a plain mkdir), so two runs started in the same second never share one."""

from __future__ import annotations

from pathlib import Path


def claim_dir(base: Path) -> Path:
    """Create and return the first of ``base``, ``base-2``, ``base-3``... that did not exist."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{base}: 10000 runs started in the same second")
