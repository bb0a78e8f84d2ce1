"""A small on-disk cache for derived arrays (the template on a grid, calibration tables).

They take seconds to compute and are the same every time, so each process should not pay for them
again. Files live in ``$SYNTHBRAIN_CACHE`` (default ``~/.cache/synthbrain``), are written atomically
and are keyed by a name plus a hash of the source code that builds them (and of nilearn's version,
whose files they come from), so changed code never reads a stale entry; a damaged file is recomputed.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

VERSION = 1


def code_hash(*modules: ModuleType) -> str:
    """A short hash of the source files of ``modules`` and of the installed nilearn version."""
    from importlib.metadata import version

    h = hashlib.sha256(version("nilearn").encode())
    for m in modules:
        h.update(Path(inspect.getsourcefile(m)).read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("SYNTHBRAIN_CACHE") or Path.home() / ".cache" / "synthbrain")


def cached_arrays(name: str, build: Callable[[], dict[str, np.ndarray]],
                  depends_on: tuple[ModuleType, ...] = ()) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from ``<cache>/<name>-<code hash>.npz`` when present."""
    path = cache_dir() / f"{name}-v{VERSION}-{code_hash(*depends_on)}.npz"
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
