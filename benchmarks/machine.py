"""The machine a run measured: cores, Python, kernel, the target's filesystem, the load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["filesystem_of", "machine_info"]


def filesystem_of(path: str | os.PathLike[str]) -> dict[str, str]:
    """The mount holding ``path`` (longest matching mount point in /proc/mounts)."""
    real = os.path.realpath(path)
    best = {"mount_point": "?", "fs_type": "unknown", "device": "?"}
    best_len = -1
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                dev, mnt, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > best_len:
                    best = {"mount_point": mnt, "fs_type": fstype, "device": dev}
                    best_len = len(mnt)
    except OSError:
        pass
    return best


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
