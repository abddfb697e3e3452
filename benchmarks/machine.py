"""The machine a run measured: cores, Python, kernel, the target's filesystem, the load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from ckptwriter.bench import clones, filesystem_type

__all__ = ["filesystem_of", "machine_info"]


def filesystem_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mount holding ``path`` and whether it clones files (as ``ckptwriter bench``)."""
    return {**filesystem_type(path), "clones": clones(path)}


def machine_info(target_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Cores, Python, kernel, filesystem of ``target_dir`` and the load right now."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "target_dir": str(Path(target_dir).resolve()),
        **filesystem_of(target_dir),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
