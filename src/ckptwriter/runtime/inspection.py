"""Finding runs and checkpoints in the runtime's output layout, for the inspection commands.

A user may point ``ckptwriter ls/verify/du`` at a checkpoints directory, a run
directory (``outputs/<run_name>/<timestamp>/``), a run name directory with all its runs
(``outputs/<run_name>/``), or the whole ``outputs/``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .. import layout
from ..errors import CheckpointNotFoundError
from ..resume import CheckpointInfo, scan_checkpoints

__all__ = [
    "CheckpointsDir",
    "find_checkpoint_dirs",
    "format_age",
    "format_size",
    "latest_name",
    "tree_size",
]


@dataclass(frozen=True)
class CheckpointsDir:
    """One checkpoints directory and the run directory that holds it (if any)."""

    path: Path
    run_dir: Path | None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Its checkpoints, oldest first (quick checks: manifest and sizes)."""
        return scan_checkpoints(self.path)


def _is_checkpoints_dir(p: Path) -> bool:
    if os.path.lexists(p / layout.LATEST_LINK) or (p / layout.LATEST_JSON).exists():
        return True
    try:
        return any(layout.parse_checkpoint_name(n) is not None for n in os.listdir(p))
    except OSError:
        return False


def _run_checkpoint_dir(run: Path) -> Path | None:
    # A run may use another checkpoint_dir name; its config.yaml says which.
    name = "checkpoints"
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        value = cfg["runtime"]["checkpoint_dir"]
        if isinstance(value, str):
            name = value
    except (OSError, yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError):
        pass
    cand = run / name
    return cand if cand.is_dir() else None


def _is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file() or (p / "checkpoints").is_dir()


def find_checkpoint_dirs(path: str | os.PathLike[str]) -> list[CheckpointsDir]:
    """Every checkpoints directory at or under ``path``, runs in name (= time) order.

    Raises:
        CheckpointNotFoundError: ``path`` holds no checkpoints directory.
    """
    if "://" in os.fspath(path):  # object storage: storage/remote_read.py
        from ..storage.remote_read import checkpoints_dirs

        return [CheckpointsDir(d, None) for d in checkpoints_dirs(os.fspath(path))]
    p = Path(path)
    if not p.is_dir():
        raise CheckpointNotFoundError(p, hint="The path does not exist or is not a directory.")
    if (p / layout.RUNTIME_JSON).exists() or layout.parse_checkpoint_name(p.name) is not None:
        return [CheckpointsDir(p.parent, _run_of(p.parent))]
    if _is_checkpoints_dir(p):
        return [CheckpointsDir(p, _run_of(p))]
    found: list[CheckpointsDir] = []
    for run in _runs_under(p, depth=2):
        ck = _run_checkpoint_dir(run)
        if ck is not None:
            found.append(CheckpointsDir(ck, run))
    if not found:
        raise CheckpointNotFoundError(
            p, hint="Expected a checkpoints directory, a run directory or outputs/<run_name>/."
        )
    return found


def _run_of(ckpt_dir: Path) -> Path | None:
    parent = ckpt_dir.parent
    return parent if (parent / "config.yaml").is_file() else None


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name) if t]


def _runs_under(p: Path, depth: int) -> list[Path]:
    if _is_run_dir(p):
        return [p]
    if depth == 0:
        return []
    try:
        # Natural order: a run started in the same second as another is `_HHMMSS_10`,
        # which must come after `_HHMMSS_9`.
        subs = sorted((e for e in os.listdir(p) if not e.startswith(".")), key=_natural)
    except OSError:
        return []
    out: list[Path] = []
    for s in subs:
        child = p / s
        if child.is_dir() and not child.is_symlink():
            out.extend(_runs_under(child, depth - 1))
    return out


def latest_name(ckpt_dir: Path) -> str | None:
    """The checkpoint name ``latest`` (symlink, else ``latest.json``) points at."""
    if "://" in os.fspath(ckpt_dir):
        from ..storage import remote_read

        return remote_read.latest_name(os.fspath(ckpt_dir))
    link = ckpt_dir / layout.LATEST_LINK
    if os.path.islink(link):
        return os.path.basename(os.readlink(link))
    try:
        data = json.loads((ckpt_dir / layout.LATEST_JSON).read_text(encoding="utf-8"))
        name = data.get("checkpoint") if isinstance(data, dict) else None
        return name if isinstance(name, str) else None
    except (OSError, ValueError):
        return None


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks are not followed)."""
    if "://" in os.fspath(path):
        from ..storage import remote_read

        return remote_read.tree_size(os.fspath(path))
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def format_size(n: int) -> str:
    """``12.3 KiB`` style sizes, as ``du -h`` prints them."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_age(timestamp: str | None, now: datetime | None = None) -> str:
    """How long ago an ISO timestamp was: ``42s``, ``5m``, ``3h``, ``2d``."""
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    secs = max(0.0, ((now or datetime.now(timezone.utc)) - then).total_seconds())
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= span:
            return f"{int(secs // span)}{unit}"
    return f"{int(secs)}s"
