"""The local POSIX backend: the read and write primitives of storage/base.py.

Protocol (DESIGN.md): every file goes into ``.tmp-ep_N-<random>/`` and is fsynced,
``runtime.json`` last; the temp directory is fsynced and renamed to ``ep_N``; the parent
is fsynced. Only then are ``latest`` (a relative symlink renamed over the old one) and
``latest.json`` (temp file, fsync, rename) replaced, and the parent fsynced again.
Deletion renames to ``.trash-*`` first so a checkpoint vanishes in one step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import layout
from ..errors import StorageError
from .base import FileSpec, ReuseToken, StoreEntry
from .local_lock import lock_directory
from .posix_io import COPY_CHUNK, copy_prefix, fsync_dir, os_error, write_all

__all__ = ["LocalStorage", "LocalStore"]

# Never world-writable, whatever the umask: the umask still narrows these further.
_FILE_MODE = 0o664
_DIR_MODE = 0o775


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


class LocalStorage:
    """A checkpoints directory on a local POSIX filesystem.

    Protocol (DESIGN.md): every file goes into ``.tmp-ep_N-<random>/`` and is fsynced,
    ``runtime.json`` last; the temp directory is fsynced and renamed to ``ep_N``; the
    parent is fsynced. Only then are ``latest`` (a relative symlink renamed over the old
    one) and ``latest.json`` (temp file, fsync, rename) replaced, and the parent fsynced
    again. Deletion renames to ``.trash-*`` first so a checkpoint vanishes in one step.

    Args:
        root: the checkpoints directory (created if missing).
        fsync: make each commit durable before ``latest`` moves. Turning it off keeps
            atomicity (rename) but a power loss may lose recent checkpoints.
    """

    # Protocol steps, in order; tests override _step to crash right after any of them.
    # memory_written and files_written are the pipeline's, reported through _step.
    STEPS = (
        "tmp_created", "memory_written", "files_written", "runtime_written",
        "tmp_dir_synced", "renamed", "parent_synced", "latest_link_replaced",
        "latest_json_replaced", "pointer_synced", "trash_renamed", "deleted",
    )

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        # Fixed now: a later chdir must not send checkpoints somewhere else.
        # Resolved once, here: a checkpoint_dir that is a symlink is written (and listed)
        # where it points now, never through the link, and a later chdir changes nothing.
        self.path = Path(os.path.realpath(root))
        self.root = str(self.path)
        self.location = self.root
        self.store = LocalStore()
        self.fsync = fsync
        # Named in DirectoryLockedError: the process a user would stop. The writer
        # process sets it to its training process.
        self.owner = f"pid {os.getpid()}"
        self._lock_fd: int | None = None

    def _step(self, name: str) -> None:
        """Called right after each protocol step; a no-op outside fault-injection tests."""

    # -- lifecycle -------------------------------------------------------------------

    def open(self, is_whole: Callable[[str], bool]) -> None:
        try:
            layout.make_dirs(self.path)
        except FileExistsError as exc:
            raise StorageError(
                f"checkpoint_dir {self.root} exists and is not a directory; "
                "point checkpoint_dir at a directory"
            ) from exc
        except OSError as exc:
            raise os_error(exc, "creating checkpoint_dir", self.root) from exc
        self._lock()
        try:
            for entry in sorted(os.listdir(self.path)):
                if layout.is_leftover(entry) and not self._restore(entry, is_whole):
                    self._remove_tree(self.path / entry)
        except OSError as exc:
            self.close()
            raise os_error(exc, "opening", self.root) from exc
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        # Never through a planted symlink or hard link (storage/local_lock.py).
        self._lock_fd = lock_directory(self.path / layout.LOCK_FILE, directory=self.root,
                                       owner=self.owner, mode=_FILE_MODE)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- commit ----------------------------------------------------------------------

    def begin(self, name: str) -> _LocalPending:
        tmp = self.path / layout.temp_name(name)
        try:
            os.mkdir(tmp, _DIR_MODE)
        except OSError as exc:
            raise os_error(exc, "writing checkpoint", self.path / name) from exc
        try:
            self._step("tmp_created")
        except BaseException:
            self._discard(tmp)
            raise
        return _LocalPending(self, name, tmp)

    def can_reuse(self, token: ReuseToken) -> bool:
        try:
            st = os.stat(token.path, follow_symlinks=False)
        except OSError:
            return False
        # A file replaced or edited in place since (same size, other bytes) must not be
        # extended with the checksum state carried for the old bytes.
        return (st.st_size, st.st_ino, st.st_mtime_ns) == (token.nbytes, *token.ident)

    def write_file(self, path: Path, data: bytes) -> None:
        """Create ``path`` (never an existing file) holding ``data``, fsynced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            write_all(fd, [memoryview(data)])
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- pointer ---------------------------------------------------------------------

    def replace_pointer(self, name: str, latest_json: bytes) -> None:
        link_tmp = self.path / layout.temp_name("latest")
        json_tmp = self.path / layout.temp_name("latest.json")
        try:
            os.symlink(name, link_tmp)
            os.replace(link_tmp, self.path / layout.LATEST_LINK)
            self._step("latest_link_replaced")
            self.write_file(json_tmp, latest_json)
            os.replace(json_tmp, self.path / layout.LATEST_JSON)
            self._step("latest_json_replaced")
            if self.fsync:
                fsync_dir(self.path)
            self._step("pointer_synced")
        except BaseException as exc:
            # ENOSPC on latest.json (its first page) used to leave its temp file behind.
            for leftover in (link_tmp, json_tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(exc, OSError):
                raise os_error(exc, "updating the latest pointer in", self.root) from exc
            raise

    # -- deletion --------------------------------------------------------------------

    def _restore(self, entry: str, is_whole: Callable[[str], bool]) -> bool:
        """Put back a checkpoint a crash left aside while a re-commit replaced it.

        Only ``.replaced-*``: ``.trash-*`` holds what retention deletes, which stays
        deleted (and may be half removed).
        """
        if not entry.startswith(layout.REPLACED_PREFIX):
            return False
        name = entry[len(layout.REPLACED_PREFIX) :].rpartition("-")[0]
        path = self.path / entry
        if layout.parse_checkpoint_name(name) is None or os.path.lexists(self.path / name):
            return False
        # Only a whole checkpoint comes back: a trash dir whose rmtree was killed
        # half-way still has runtime.json but not all its files (found by the torture).
        if path.is_symlink() or not is_whole(str(path)):
            return False
        os.rename(path, self.path / name)
        return True

    def delete(self, name: str) -> None:
        try:
            trash = self._to_trash(name)
        except FileNotFoundError:
            return  # already gone: nothing to delete
        except OSError as exc:
            raise os_error(exc, "deleting checkpoint", self.path / name) from exc
        # The checkpoint is gone for readers once renamed. A failure to remove the trash
        # is still reported (a retention error), and the next pass finds the name gone.
        try:
            self._step("trash_renamed")
            self._remove_tree(trash)
            self._step("deleted")
        except OSError as exc:
            raise os_error(exc, "removing deleted checkpoint", trash) from exc

    def _to_trash(self, name: str) -> Path:
        trash = self.path / layout.trash_name(name)
        os.rename(self.path / name, trash)
        return trash

    @classmethod
    def _discard(cls, path: Path) -> None:
        # Cleanup after a failure must not mask it: on a read-only filesystem even
        # unlinking a missing temp dir fails (EROFS). A next writer start removes leftovers.
        with contextlib.suppress(OSError):
            cls._remove_tree(path)

    @staticmethod
    def _remove_tree(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path)


class _LocalPending:
    """A checkpoint being written into its temp directory."""

    def __init__(self, storage: LocalStorage, name: str, tmp: Path) -> None:
        self.name = name
        self._s = storage
        self._tmp = tmp
        self._final = storage.path / name

    def write(self, files: Sequence[FileSpec]) -> dict[str, ReuseToken]:
        tokens: dict[str, ReuseToken] = {}
        try:
            for spec in files:
                tokens[spec.name] = self._write_one(spec)
        except OSError as exc:
            raise os_error(exc, "writing checkpoint", self._final) from exc
        return tokens

    def _write_one(self, spec: FileSpec) -> ReuseToken:
        fd = os.open(self._tmp / spec.name,
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            if spec.reuse is not None:
                copy_prefix(spec.reuse.path, fd, spec.reuse.nbytes)
            write_all(fd, [memoryview(d) for d in spec.data])
            if self._s.fsync:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        # rename keeps the inode and mtime: the token holds for the final path.
        return ReuseToken(str(self._final / spec.name), st.st_size, (st.st_ino, st.st_mtime_ns))

    def finalize(self, marker: bytes) -> str:
        s, tmp, final = self._s, self._tmp, self._final
        try:
            s.write_file(tmp / layout.RUNTIME_JSON, marker)
            s._step("runtime_written")
            if s.fsync:
                fsync_dir(tmp)
            s._step("tmp_dir_synced")
            # Same episode written again (a retry, a resume into the same directory): the
            # old copy is moved aside only now and removed only once the new one is in
            # place; a crash in between leaves it in .replaced-*, which open() puts back.
            old = None
            if os.path.lexists(final):
                old = s.path / layout.replaced_name(self.name)
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                s._discard(old)
            s._step("renamed")
            if s.fsync:
                fsync_dir(s.path)
            s._step("parent_synced")
        except OSError as exc:
            raise os_error(exc, "writing checkpoint", final) from exc
        return str(final)

    def discard(self) -> None:
        self._s._discard(self._tmp)
