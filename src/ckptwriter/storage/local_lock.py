"""The single-writer lock of a local checkpoints directory: ``flock`` on ``.lock``.

The lock file is only ever a regular file of the directory, with one name: a ``.lock``
that is a symlink (dangling or not), a hard link to another file, a FIFO or a device is
refused before anything is written, so a planted link can never make the writer truncate
or create a file outside (the directory may be group-writable).

Refused rather than replaced: a fresh file renamed over the planted entry would be an
unconditional rename, so two writers that both found it unsafe could each rename one in
and each lock a file of its own, and both would own the directory.

Forks: a child forked by the training process (a data loader, ``multiprocessing``)
inherits the lock's descriptor, and ``flock`` lasts until every copy is closed, so the
child kept the directory locked after its parent died. Every lock still held is closed
in a forked child right after ``fork`` (closing the child's copy leaves the parent's lock
in place); descriptors are close-on-exec as well.

Error handling:
    :func:`lock_directory` raises :class:`DirectoryLockedError` when another live
    writer holds the lock, and :class:`StorageError` when the lock file cannot be
    created or is unsafe (the message says to remove it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import weakref
from collections.abc import Callable
from pathlib import Path

from ..errors import DirectoryLockedError, StorageError
from .posix_io import os_error

__all__ = ["DirectoryLock", "lock_directory"]

# Opened without following a final symlink, without blocking on a FIFO planted in its
# place, and without it becoming a controlling terminal.
_LOCK_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
)


class DirectoryLock:
    """A held lock: its descriptor, closed by :meth:`close` (or in a forked child)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        st = os.fstat(fd)
        # What the descriptor is: a forked child closes its number only while it still
        # names this file (not a number the parent has since closed and reused).
        self._ident = (st.st_dev, st.st_ino)
        _HELD.add(self)

    def close(self) -> None:
        """Release the lock (a no-op once closed)."""
        fd = self.fd
        if fd is not None:
            # Closed before it is forgotten: a fork from another thread meanwhile still
            # finds the lock here, and its child closes its copy.
            os.close(fd)
        self.fd = None
        _HELD.discard(self)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # Like a file object: a lock nobody can close any more is released (``os`` may
        # already be torn down at interpreter exit, hence the bound ``_close``).
        self._drop(_close)

    def _drop(self, close: Callable[[int], None] = os.close) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                close(fd)

    def _drop_in_child(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            st = os.fstat(fd)
        except OSError:
            return  # closed in the parent just before the fork
        if (st.st_dev, st.st_ino) == self._ident:
            with contextlib.suppress(OSError):
                os.close(fd)


# Weak: a lock dropped without close() closes its descriptor as it goes (``__del__``),
# so a child never closes a number since reused for something else.
_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Runs in the child only, single-threaded: no lock may be taken here.
    for lock in list(_HELD):
        lock._drop_in_child()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def lock_directory(dir_fd: int, path: Path, *, directory: str, owner: str,
                   mode: int) -> DirectoryLock:
    """Lock ``directory`` through its lock file ``path``, opened relative to ``dir_fd``.

    Args:
        dir_fd: the open checkpoints directory; the lock file is its entry ``path.name``.
        path: the lock file (created with ``mode`` if missing), as named in errors.
        directory: the checkpoints directory, as named in the error.
        owner: who holds the lock, written into the file for the next writer's error.
        mode: the lock file's mode when it is created.

    Returns:
        the held lock; it lasts until closed or the process dies.

    Raises:
        DirectoryLockedError: another live writer holds the lock.
        StorageError: the lock file cannot be created, or is not a file the writer made.
    """
    name = path.name
    try:
        fd = os.open(name, _LOCK_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        # O_NOFOLLOW: a symlinked .lock (a dangling one too) fails here, never followed.
        found = _not_a_file(dir_fd, name)
        if found is not None:
            raise _unsafe(path, found) from None
        raise os_error(exc, "creating the lock file", path) from exc
    try:
        # Checked before anything is written: through a hard link (or a FIFO, a device)
        # the truncate and write below would land outside the directory.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, "is not a regular file")
        if st.st_nlink != 1:
            raise _unsafe(path, f"is a hard link ({st.st_nlink} names for one file)")
        try:
            # flock dies with its process, so a crashed writer never leaves a stale lock.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryLockedError(
                f"Checkpoint directory {directory} is locked by another writer ({holder}). "
                "Only one writer may own a checkpoints directory: stop the other run or "
                "use another checkpoint_dir."
            ) from None
        # A lock on a file that is no longer .lock excludes nobody: the entry must still
        # be the file we locked (the writer never replaces or removes it).
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise _unsafe(path, "was replaced while it was being locked")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner} on {os.uname().nodename}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DirectoryLock(fd)


def _not_a_file(dir_fd: int, name: str) -> str | None:
    """What entry ``name`` is, unless it is missing or a regular file (not followed)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "is a symlink"
    return "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"


def _unsafe(path: Path, found: str) -> StorageError:
    return StorageError(
        f"the lock file {path} {found}, expected a regular file the writer created; it is "
        "never followed or written: remove it (and check who put it there), then start again"
    )
