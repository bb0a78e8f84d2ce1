"""A small on-disk cache for derived arrays (the template on a grid, calibration tables).

They take seconds to compute and are the same every time, so each process should not pay for them
again. Files live in ``$SYNTHBRAIN_CACHE`` (default ``~/.cache/synthbrain``), are written atomically
and are keyed by a name that includes a version; a damaged file is recomputed.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("SYNTHBRAIN_CACHE") or Path.home() / ".cache" / "synthbrain")


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from ``<cache>/<name>-v<VERSION>.npz`` when present."""
    path = cache_dir() / f"{name}-v{VERSION}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # damaged: rebuild below
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: work without the cache
    return arrays
