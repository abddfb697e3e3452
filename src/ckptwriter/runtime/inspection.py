"""Finding runs and checkpoints in the runtime's output layout, for the inspection commands.

A user may point ``ckptwriter ls/verify/du`` at a checkpoints directory, a run
directory (``outputs/<run_name>/<timestamp>/``), a run name directory with all its runs
(``outputs/<run_name>/``), or the whole ``outputs/``; on a local disk or on object
storage alike (the reader's discovery rules, :mod:`ckptwriter.discovery`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import layout
from ..discovery import (
    POINTER_NAMES,
    checkpoints_dirs,
    followed,
    guarded,
    name_of,
    open_location,
)
from ..errors import CheckpointCorruptError, UnsafePathError
from ..reader import CheckpointInfo, _pointer, latest_status, list_checkpoints
from ..storage.dirfd import identity, open_dir
from ..storage.urlpath import URLPath

__all__ = [
    "CheckpointsDir",
    "best_name",
    "checkpoint_at",
    "disk_usage",
    "find_checkpoint_dirs",
    "format_age",
    "format_size",
    "latest_name",
    "shared_with",
    "tree_size",
]


@dataclass(frozen=True)
class CheckpointsDir:
    """One checkpoints directory and the run directory that holds it (if any)."""

    path: Path
    run_dir: Path | None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Its checkpoints, oldest first (quick checks: manifest and sizes)."""
        return list_checkpoints(self.path)


def find_checkpoint_dirs(path: str | os.PathLike[str]) -> list[CheckpointsDir]:
    """Every checkpoints directory at or under ``path``, runs in their natural order.

    Raises:
        CheckpointNotFoundError: ``path`` holds no checkpoints directory.
        StorageError: the store cannot be read.
    """
    store, where = open_location(path)
    found = guarded(store, where, "listing",
                    lambda: checkpoints_dirs(store, where, os.fspath(path)))
    return [CheckpointsDir(store.as_path(d), None if run is None else store.as_path(run))
            for d, run in found]


def checkpoint_at(path: str | os.PathLike[str]) -> Path | None:
    """``path`` as a Path if it names one checkpoint directory (not a directory of them).

    A pointer (``latest``, ``best``) names the one checkpoint it points at (by the
    readers' pointer rules: nothing is looked at through it here); an ``ep_*`` symlink
    is returned as named, for :func:`~ckptwriter.verify_checkpoint` to refuse.
    """
    store, where = open_location(path)

    def find() -> Path | None:
        try:
            ckpt = followed(store, where)
        except UnsafePathError:
            return store.as_path(where)
        if name_of(ckpt) in POINTER_NAMES:
            return store.as_path(ckpt) if store.readlink(ckpt) is not None else None
        if layout.parse_checkpoint_name(name_of(ckpt)) is None:
            marker = store.stat(store.join(ckpt, layout.RUNTIME_JSON))
            if marker is None or marker.kind != "file":
                return None
        return store.as_path(ckpt)

    return guarded(store, where, "listing", find)


def latest_name(ckpt_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint name ``latest`` (symlink, else ``latest.json``) points at, if usable."""
    return latest_status(ckpt_dir).name


def best_name(ckpt_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint name ``best`` (symlink, else ``best.json``) points at, if any.

    An unreadable or unsafe ``best`` is shown as no best: ``verify`` is the command that
    reports broken files, ``ls`` only lists.
    """
    store, where = open_location(ckpt_dir)

    def read() -> str | None:
        try:
            name, _ = _pointer(store, followed(store, where), layout.BEST_LINK)
        except CheckpointCorruptError:
            return None
        return name

    return guarded(store, where, "reading best in", read)


def tree_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files (objects) under ``path``, from one listing.

    Symlinks are neither followed nor counted, ``path`` itself included: a symlinked
    ``ep_*`` adds nothing, whatever it points at.
    """
    store, where = open_location(path)
    return guarded(store, where, "listing", lambda: sum(store.sizes(where).values()))


def disk_usage(path: str | os.PathLike[str], seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes ``path`` occupies on disk, as ``du`` counts them (``st_blocks * 512``).

    Directories count (as in ``du``); a file hard-linked more than once counts once,
    also across calls sharing ``seen``; symlinks are neither followed (``path`` itself
    included) nor counted, so a symlinked ``ep_*`` adds nothing. On object storage,
    which has no blocks: the objects' sizes (:func:`tree_size`).
    """
    if isinstance(path, URLPath):
        return tree_size(path)
    inodes = set() if seen is None else seen
    return sum(_blocks(_walk(os.fspath(path)), inodes))


def _walk(top: str) -> Iterable[os.stat_result]:
    # An entry that vanishes mid-walk (retention deleting a checkpoint) counts nothing.
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    yield st
    if not stat.S_ISDIR(st.st_mode):
        return
    for dirpath, dirs, files in os.walk(top, followlinks=False):
        for name in (*dirs, *files):
            try:
                yield os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue


def _blocks(stats: Iterable[os.stat_result], seen: set[tuple[int, int]]) -> Iterable[int]:
    for st in stats:
        if stat.S_ISLNK(st.st_mode):
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        # st_blocks is in 512-byte units whatever the filesystem's block size (POSIX).
        yield st.st_blocks * 512


def shared_with(ckpt: str | os.PathLike[str], file: str) -> list[str]:
    """The other checkpoints of ``ckpt``'s directory holding ``file`` itself (the same
    inode: a file linked from checkpoint to checkpoint), oldest first; [] on object
    storage (a copy there is an object of its own) or when ``file`` is not there.

    Each checkpoint is opened relative to the checkpoints directory, ``O_NOFOLLOW``: a
    planted ``ep_*`` symlink is never entered, so no directory outside is listed.
    """
    if isinstance(ckpt, URLPath) or file in ("", ".", "..") or "/" in file:
        return []
    top = Path(ckpt)
    try:
        root = os.open(top.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        st = _stat_in(root, top.name, file)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            return []
        names = sorted((ep, n) for n in os.listdir(root)
                       if (ep := layout.parse_checkpoint_name(n)) is not None
                       and n != top.name)
        return [name for _, name in names if _holds(root, name, identity(st))]
    finally:
        os.close(root)


def _stat_in(root: int, ckpt: str, file: str) -> os.stat_result | None:
    try:
        fd = open_dir(ckpt, root)
    except OSError:
        return None
    try:
        return os.stat(file, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)


def _holds(root: int, ckpt: str, inode: tuple[int, int]) -> bool:
    """True if checkpoint ``ckpt`` of ``root`` (a real directory) has an entry ``inode``."""
    try:
        fd = open_dir(ckpt, root)
    except OSError:
        return False  # gone, or not a directory (a planted symlink is never entered)
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
        for name in names:
            try:
                if identity(os.stat(name, dir_fd=fd, follow_symlinks=False)) == inode:
                    return True
            except OSError:
                continue
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


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
