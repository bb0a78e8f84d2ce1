"""Write one benchmark's section of benchmarks/results.md (between its own markers)."""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun the command to refresh it.\n"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section ``name`` in results.md."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    _put_section(name, f"<!-- {name} -->\n## {name}\n\nCommand: `{command}`  \nMeasured {stamp} on {machine()}.\n\n"
                       f"{body.strip()}\n<!-- /{name} -->\n")


def import_section(name: str, section: str) -> None:
    """Put a whole section written elsewhere (a device session's results.md, its own date and machine
    line kept) in place of the section ``name``."""
    if not (section.startswith(f"<!-- {name} -->\n") and section.endswith(f"<!-- /{name} -->\n")):
        raise ValueError(f"not a results.md section named {name!r}")
    _put_section(name, section)


def _put_section(name: str, section: str) -> None:
    """Replace (or append) ``section`` as ``name`` in results.md: read, replace and write under an
    exclusive lock and through a rename, so two benchmarks finishing together both land."""
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
    with open(RESULTS.with_suffix(".md.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = RESULTS.read_text() if RESULTS.is_file() else HEADER
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
        tmp = RESULTS.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, RESULTS)
