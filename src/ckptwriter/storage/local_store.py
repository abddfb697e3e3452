"""The local read primitives of storage/base.py: what readers use on a local disk."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import StorageError
from .base import StoreEntry
from .posix_io import COPY_CHUNK, os_error

__all__ = ["LocalStore"]


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
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            # ENAMETOOLONG, ELOOP...: a name from a hostile pointer is simply not there.
            return None
        if stat.S_ISLNK(st.st_mode):
            return StoreEntry("link")
        if stat.S_ISDIR(st.st_mode):
            return StoreEntry("dir")
        if stat.S_ISREG(st.st_mode):
            return StoreEntry("file", st.st_size)
        return StoreEntry("other")

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

    def read(self, path: str) -> bytes:
        """A regular file's bytes, opened without following a final symlink."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IsADirectoryError(errno.ELOOP, "is a symlink", path) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is not a regular file", path)
            chunks: list[bytes] = []
            left = st.st_size
            while True:
                # One read of the recorded size, then until EOF: a file that grows while
                # read is read whole, and its checksum decides whether it is usable.
                chunk = os.read(fd, max(left, COPY_CHUNK))
                if not chunk:
                    break
                chunks.append(chunk)
                left = 0
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        finally:
            os.close(fd)

    def readlink(self, path: str) -> str | None:
        """A symlink's target, or None."""
        try:
            return os.readlink(path)
        except OSError:
            return None

    def sizes(self, path: str) -> dict[str, int]:
        """Regular files below ``path`` (symlinks neither followed nor counted)."""
        out: dict[str, int] = {}
        base = path.rstrip("/") or "/"
        top = self.stat(base)
        if top is None or top.kind != "dir":
            # os.walk lists a symlinked top directory's target: a planted ep_* link must
            # not make `du` (or a listing) count or read a tree outside (issue 10).
            return out
        for dirpath, _dirs, files in os.walk(base, followlinks=False):
            rel = os.path.relpath(dirpath, base)
            for f in files:
                full = os.path.join(dirpath, f)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[f if rel == "." else f"{rel}/{f}"] = st.st_size
        return out

    def error(self, exc: BaseException, action: str, path: str) -> Exception:
        """An OSError as a StorageError with the fix."""
        if isinstance(exc, OSError):
            return os_error(exc, action, path)
        return StorageError(f"{exc} while {action} {path}")
