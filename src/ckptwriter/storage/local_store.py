"""The local read primitives of storage/base.py: what readers use on a local disk.

A checkpoint is opened once (:meth:`LocalStore.open_dir`: ``O_NOFOLLOW | O_DIRECTORY``
below the directory that holds it) and its files are opened relative to that descriptor,
``O_NOFOLLOW``: an ``ep_*`` swapped for a symlink after a reader checked it cannot make
the reader read another tree (what the writer does, storage/dirfd.py).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StorageError
from .base import FileTooLargeError, StoreEntry
from .dirfd import DIR_FLAGS, identity, open_dir
from .posix_io import COPY_CHUNK, os_error

__all__ = ["LocalStore"]

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _entry(st: os.stat_result) -> StoreEntry:
    if stat.S_ISLNK(st.st_mode):
        return StoreEntry("link")
    if stat.S_ISDIR(st.st_mode):
        return StoreEntry("dir")
    if stat.S_ISREG(st.st_mode):
        return StoreEntry("file", st.st_size)
    return StoreEntry("other")


def _opened(name: str, path: str, dir_fd: int | None = None) -> int:
    """A regular file opened for reading, never through a final symlink."""
    try:
        return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IsADirectoryError(errno.ELOOP, "is a symlink", path) from None
        raise


def _read_fd(fd: int, path: str, limit: int | None) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is not a regular file", path)
    if limit is not None and st.st_size > limit:
        # Checked before reading: a planted sparse file of terabytes costs nothing.
        raise FileTooLargeError(path, st.st_size, limit)
    chunks: list[bytes] = []
    left, total = st.st_size, 0
    while True:
        # One read of the recorded size, then until EOF: a file that grows while read is
        # read whole (up to ``limit``), and its checksum decides whether it is usable.
        want = max(left, COPY_CHUNK)
        if limit is not None:
            want = min(want, limit + 1 - total)
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        left = 0
        if limit is not None and total > limit:
            raise FileTooLargeError(path, os.fstat(fd).st_size, limit)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Dir:
    """A directory opened once (see :class:`~ckptwriter.storage.base.DirReader`)."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        path = os.path.join(self._path, name)
        if name in ("", ".", "..") or "/" in name:
            raise OSError(errno.EINVAL, "not a plain file name", path)
        fd = _opened(name, path, self._fd)
        try:
            return _read_fd(fd, path, limit)
        finally:
            os.close(fd)

    def moved(self) -> bool:
        try:
            now = os.lstat(self._path)
        except OSError:
            return True
        return identity(now) != identity(os.fstat(self._fd))

    def stat(self, name: str) -> StoreEntry | None:
        if name in ("", ".", "..") or "/" in name:
            return None
        try:
            return _entry(os.stat(name, dir_fd=self._fd, follow_symlinks=False))
        except OSError:
            return None


class LocalStore:
    """The read primitives (storage/base.py) over the local filesystem.

    A final symlink is never followed: checkpoints are real directories and files of
    their checkpoints directory, so a planted link cannot lead a reader anywhere else.
    """

    marker_commits = False

    def check_root(self, path: str) -> None:
        """Nothing to check before reading a local path."""

    def url(self, path: str) -> str:
        """A local path is shown as it is."""
        return path

    def as_path(self, path: str) -> Path:
        """The path as a Path."""
        return Path(path)

    def join(self, base: str, *names: str) -> str:
        """A child path."""
        return os.path.join(base, *names)

    def parent(self, path: str) -> str:
        """The containing directory."""
        return os.path.dirname(os.path.normpath(path)) or "."

    def stat(self, path: str) -> StoreEntry | None:
        """What is at ``path``, a symlink reported as ``link``."""
        try:
            st = os.lstat(path)
        except OSError:
            # ENOENT, ENOTDIR, ENAMETOOLONG, ELOOP...: a name from a hostile pointer is
            # simply not there.
            return None
        return _entry(st)

    def listdir(self, path: str) -> list[str] | None:
        """Names in a directory (not through a final symlink); None if not a directory."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.listdir(fd)
        except OSError:
            return None
        finally:
            os.close(fd)

    def read(self, path: str, *, limit: int | None = None) -> bytes:
        """A regular file's bytes, opened without following a final symlink."""
        fd = _opened(path, path)
        try:
            return _read_fd(fd, path, limit)
        finally:
            os.close(fd)

    @contextmanager
    def open_dir(self, path: str) -> Iterator[_Dir]:
        """Directory ``path`` opened once, ``O_NOFOLLOW`` below the directory holding it."""
        parent, _, name = path.rstrip("/").rpartition("/")
        if name in ("", ".", ".."):
            # Nothing to swap in at "." (the writer checks a directory it holds open as
            # /proc/self/fd/N/.): it is the very directory its parent path leads to.
            fd = os.open(path, DIR_FLAGS)
        else:
            # The holding directory is the user's (their symlinks to it are theirs to
            # follow); the checkpoint in it must be a real directory.
            holder = parent or ("/" if path.startswith("/") else ".")
            pfd = os.open(holder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = self._open_below(pfd, name, path)
            finally:
                os.close(pfd)
        try:
            yield _Dir(fd, path)
        finally:
            os.close(fd)

    @staticmethod
    def _open_below(pfd: int, name: str, path: str) -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise NotADirectoryError(errno.ELOOP, "is a symlink", path) from None
            raise

    def readlink(self, path: str) -> str | None:
        """A symlink's target, or None."""
        try:
            return os.readlink(path)
        except OSError:
            return None

    def sizes(self, path: str) -> dict[str, int]:
        """Regular files below ``path`` (symlinks neither followed nor counted)."""
        out: dict[str, int] = {}
        try:
            # A symlinked top (a planted ep_* link, issue 10) lists nothing.
            top = os.open(path.rstrip("/") or "/", DIR_FLAGS)
        except OSError:
            return out
        # Each directory is opened relative to its parent's descriptor, O_NOFOLLOW: an
        # entry swapped for a symlink mid-walk never makes it list a tree outside.
        stack: list[tuple[int, str]] = [(top, "")]
        try:
            while stack:
                fd, rel = stack.pop()
                try:
                    self._sizes_in(fd, rel, out, stack)
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)
        return out

    @staticmethod
    def _sizes_in(fd: int, rel: str, out: dict[str, int], below: list[tuple[int, str]]) -> None:
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
        except OSError:
            return
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    out[rel + name] = st.st_size
                elif stat.S_ISDIR(st.st_mode):
                    below.append((open_dir(name, fd), f"{rel}{name}/"))
            except OSError:
                continue  # vanished (retention deleting it), or swapped for a symlink

    def error(self, exc: BaseException, action: str, path: str) -> Exception:
        """An OSError as a StorageError with the fix."""
        if isinstance(exc, OSError):
            return os_error(exc, action, path)
        return StorageError(f"{exc} while {action} {path}")
