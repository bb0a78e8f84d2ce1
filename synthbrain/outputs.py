"""Output paths checked before any work starts: a command that would fail to write its result after
minutes of computing fails at once instead, with one line that names the path and what is wrong.

A probe (a hidden folder made and removed at once) tells whether a folder can be written: permission
bits alone cannot (root passes every ``os.access`` test, and ``/proc`` refuses new entries anyway).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from synthbrain.errors import OutputPathError


def _probe(folder: Path, path: Path) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".synthbrain-probe-", dir=folder))
    except OSError as e:
        # /proc answers "No such file or directory" to any new entry
        why = "it accepts no new files" if e.errno == errno.ENOENT else e.strerror or str(e)
        raise OutputPathError(f"{path}: cannot write into {folder} ({why})") from None


def check_output_file(path: str | os.PathLike, suffixes: Sequence[str] = ()) -> Path:
    """Refuse an output file that could not be written: its folder missing, not a folder or read-only,
    the path itself a folder, or a name without one of ``suffixes``. An existing file is replaced
    (atomically) by the command. Returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder; give a file name")
    if suffixes and not path.name.endswith(tuple(suffixes)):
        raise OutputPathError(f"{path}: the output must end in {' or '.join(suffixes)}")
    parent = path.parent
    if not parent.exists():
        raise OutputPathError(f"{path}: the folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise OutputPathError(f"{path}: {parent} is a file, not a folder")
    _probe(parent, path)
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Refuse an output folder that could not be made or written: a file in its place or on its way,
    or a read-only (or pseudo) file system at its nearest existing ancestor. Missing folders are made
    by the command, as ``mkdir -p`` would. Returns ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{path}: {existing} is a file, not a folder")
    _probe(existing, path)
    return path
