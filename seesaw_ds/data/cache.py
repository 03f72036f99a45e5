"""Where derived data (parsed datasets, converted models) is cached: `$SEESAW_CACHE` or `~/.cache/seesaw_ds`."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(subdir: str | None = None) -> Path:
    root = Path(os.environ.get("SEESAW_CACHE") or Path.home() / ".cache" / "seesaw_ds")
    path = root / subdir if subdir else root
    path.mkdir(parents=True, exist_ok=True)
    return path
