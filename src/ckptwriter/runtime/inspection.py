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

from pydantic import ValidationError

from .. import layout
from ..discovery import checkpoints_dirs, followed, guarded, name_of, open_location
from ..errors import CheckpointCorruptError, UnsafePathError
from ..manifest import MAX_DOCUMENT_BYTES, LatestPointer
from ..reader import CheckpointInfo, _named_pointer, _pointer, list_checkpoints
from ..storage.base import ReadStore
from ..storage.dirfd import identity, open_dir
from ..storage.urlpath import URLPath

__all__ = [
    "CheckpointsDir",
    "LatestStatus",
    "best_name",
    "checkpoint_at",
    "disk_usage",
    "find_checkpoint_dirs",
    "format_age",
    "format_size",
    "latest_name",
    "latest_status",
    "shared_with",
    "tree_size",
]

# Listings one consistent view of a live checkpoints directory may take: another is taken
# only when latest moved during the last one (a commit made meanwhile), so this bounds a
# reader lapped forever, not a normal one.
_LISTINGS = 1000


@dataclass(frozen=True)
class LatestStatus:
    """What ``latest`` of a checkpoints directory says, for ``ckptwriter ls`` and ``verify``.

    Attributes:
        name: the checkpoint it names (a plain name), or None (missing, invalid, unsafe).
        problem: why it must not be followed (it leads outside, it cannot be read).
        json_problem: ``latest.json`` disagreeing with the ``latest`` symlink readers use.
    """

    name: str | None
    problem: str | None = None
    json_problem: str | None = None


def _json_problem(store: ReadStore, root: str, link: str) -> str | None:
    try:
        ptr = LatestPointer.model_validate_json(
            store.read(store.join(root, layout.LATEST_JSON), limit=MAX_DOCUMENT_BYTES))
    except FileNotFoundError:
        return "missing (readers use the latest symlink; the next checkpoint writes it)"
    except (OSError, ValidationError):
        return "invalid (readers use the latest symlink; the next checkpoint rewrites it)"
    if ptr.checkpoint != link:
        return (f"names {ptr.checkpoint} but latest points at {link} (a crash between "
                "the two updates: readers use the symlink; the next checkpoint repairs it)")
    return None


def latest_status(checkpoints_dir: str | os.PathLike[str]) -> LatestStatus:
    """Where ``latest`` of a checkpoints directory points, read by the readers' rules.

    Raises:
        StorageError: the store cannot be read.
    """
    store, where = open_location(checkpoints_dir)

    def status() -> LatestStatus:
        root = followed(store, where)
        try:
            name, _ = _pointer(store, root)
        except CheckpointCorruptError as exc:
            return LatestStatus(None, f"{exc.file}: {exc.problem}")
        link = store.readlink(store.join(root, layout.LATEST_LINK))
        return LatestStatus(name, None, None if link is None else _json_problem(store, root, link))

    return guarded(store, where, "reading latest in", status)


@dataclass(frozen=True)
class CheckpointsDir:
    """One checkpoints directory and the run directory that holds it (if any)."""

    path: Path
    run_dir: Path | None

    def checkpoints(self) -> list[CheckpointInfo]:
        """Its checkpoints, oldest first (quick checks: manifest and sizes)."""
        return list_checkpoints(self.path)

    def listing(self) -> tuple[list[CheckpointInfo], LatestStatus]:
        """Its checkpoints and what ``latest`` says, in one view even while a writer runs.

        ``latest`` is read before and after the listing, and the listing taken again
        until both agree: a live writer that moved ``latest`` meanwhile (and retired what
        it named) is not a dangling ``latest``. One that names nothing listed is looked at
        once more before it is believed.

        Raises:
            StorageError: the store cannot be read.
        """
        before, doubt = latest_status(self.path), None
        for _ in range(_LISTINGS):
            infos = self.checkpoints()
            after = latest_status(self.path)
            dangling = after.name is not None and after.name not in {i.name for i in infos}
            if after == before and (not dangling or doubt == after):
                break
            before, doubt = after, after if dangling else None
        return infos, after

    def problem_of(self, name: str) -> str | None:
        """Why checkpoint ``name``, listed but then not found, is broken; None if it is gone
        (a live writer's retention deleted it meanwhile) or whole again (re-committed)."""
        for info in self.checkpoints():
            if info.name == name and not info.complete:
                return info.problem or "not a checkpoint directory"
        return None


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
    """``path`` as a Path if it names one checkpoint (a directory, or ``latest``,
    ``latest.json``, ``best``, ``best.json``), not a directory of them.

    A pointer names the one checkpoint it points at (by the readers' pointer rules:
    nothing is looked at through it here); an ``ep_*`` symlink is returned as named, for
    :func:`~ckptwriter.verify_checkpoint` to refuse.
    """
    store, where = open_location(path)

    def find() -> Path | None:
        if _named_pointer(store, where) is not None:
            return store.as_path(where)  # latest or best: what it names, when verified
        try:
            ckpt = followed(store, where)
        except UnsafePathError:
            return store.as_path(where)
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
