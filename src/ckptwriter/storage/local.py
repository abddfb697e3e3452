"""The local POSIX backend: the read and write primitives of storage/base.py.

Protocol (DESIGN.md): every file goes into ``.tmp-ep_N-<random>/`` and is fsynced,
``runtime.json`` last; the temp directory is fsynced and renamed to ``ep_N`` (swapped
with the old ``ep_N`` in one step when the episode is committed again); the parent is
fsynced. Only then are ``latest`` (a relative symlink renamed over the old one) and
``latest.json`` (temp file, fsync, rename) replaced, and the parent fsynced again;
``best`` and ``best.json`` move the same way, next, when a commit beats the best score.
Deletion renames to ``.trash-*`` first so a checkpoint vanishes in one step.

Everything the writer creates, renames or removes is reached through the directory
descriptor opened (and locked) at :meth:`LocalStorage.open`, never through a path
(storage/dirfd.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import layout
from ..errors import StorageError
from .base import FileSpec, ReuseToken
from .dirfd import exchange, identity, open_dir, remove_entry
from .local_leftovers import clean_leftovers
from .local_lock import DirectoryLock, lock_directory
from .local_reuse import OwnChanges, link_checked, open_checked, token_ident, unlink_recorded
from .local_store import LocalStore
from .posix_io import copy_prefix, os_error, write_all

__all__ = ["LocalStorage", "LocalStore"]

# Never world-writable, whatever the umask: the umask still narrows these further.
_FILE_MODE = 0o664
_DIR_MODE = 0o775
# A new file only, never through a symlink, never kept open across exec.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What renameat2(RENAME_EXCHANGE) answers where the filesystem or kernel has no swap.
_NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_POINTER_JSON = {layout.LATEST_LINK: layout.LATEST_JSON, layout.BEST_LINK: layout.BEST_JSON}


class LocalStorage:
    """A checkpoints directory on a local POSIX filesystem (protocol: module docstring).

    Re-committing an episode (a retry, ``checkpoint_on_start`` after a resume in place)
    swaps the new directory with the old one (``renameat2(RENAME_EXCHANGE)``), so
    ``ep_N`` names a whole checkpoint at every instant, then removes the old copy. Where
    the filesystem has no such swap (NFS, some FUSE, non-Linux), the old copy is renamed
    to ``.replaced-*`` first: ``ep_N`` is missing for a moment, and a crash then leaves
    it aside, put back by the next :meth:`open`.

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
    # Steps only a re-commit takes, after parent_synced (old_moved_aside: only where
    # the swap is not supported, between moving the old copy aside and renaming).
    RECOMMIT_STEPS = ("old_moved_aside", "old_copy_trashed", "old_copy_removed")
    # Steps of the best pointer, after pointer_synced and before retention: taken only
    # when best moves (a commit that beats it), or is removed (nothing has a score).
    BEST_STEPS = ("best_link_replaced", "best_json_replaced", "best_synced",
                  "best_json_removed", "best_link_removed")

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
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
        self._dir_fd: int | None = None
        self._lock: DirectoryLock | None = None
        self._ident: tuple[int, int] = (0, 0)
        # ctime moves of shared files this writer itself linked or unlinked.
        self._own = OwnChanges()

    def _step(self, name: str) -> None:
        """Called right after each protocol step; a no-op outside fault-injection tests."""

    @property
    def _fd(self) -> int:
        if self._dir_fd is None:
            raise StorageError(f"the checkpoints directory {self.root} is not open; "
                               "open the writer before committing")
        return self._dir_fd

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
        try:
            self._dir_fd = open_dir(self.root)
        except OSError as exc:
            raise os_error(exc, "opening", self.root) from exc
        try:
            self._ident = identity(os.fstat(self._dir_fd))
            # Never through a planted symlink or hard link (storage/local_lock.py).
            self._lock = lock_directory(self._dir_fd, self.path / layout.LOCK_FILE,
                                        directory=self.root, owner=self.owner,
                                        mode=_FILE_MODE)
            self._check_in_place("opening", self.root)
            clean_leftovers(self._dir_fd, self.path, is_whole)
        except OSError as exc:
            self.close()
            raise os_error(exc, "opening", self.root) from exc
        except BaseException:
            self.close()
            raise

    def _check_in_place(self, action: str, shown: Path | str) -> None:
        """Fail unless the path still names the directory this writer opened and locked.

        Writes go through the descriptor whatever happens to the path; this keeps them
        from going on, silently, into a directory no longer where the user looks.
        """
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise os_error(exc, action, shown) from exc
        if identity(st) == self._ident and os.statvfs(self.root).f_flag & os.ST_RDONLY:
            # The descriptor may still reach the directory through a writable mount
            # while the path the user sees is now read-only (a bind, a remount): the
            # user's view decides, as it would for a writer opened now.
            err = OSError(errno.EROFS, os.strerror(errno.EROFS))
            raise os_error(err, action, shown) from None
        if identity(st) != self._ident:
            raise StorageError(
                f"checkpoint_dir {self.root} is no longer the directory this writer "
                f"locked when it started (it was moved or replaced, or a component of "
                f"the path now leads elsewhere) while {action} {shown}; nothing was "
                "written there: put the directory back, or restart the run to write "
                "where checkpoint_dir points now"
            )

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- commit ----------------------------------------------------------------------

    def begin(self, name: str) -> _LocalPending:
        fd = self._fd
        self._check_in_place("writing checkpoint", self.path / name)
        tmp = layout.temp_name(name)
        try:
            os.mkdir(tmp, _DIR_MODE, dir_fd=fd)
            tmp_fd = open_dir(tmp, fd)
        except OSError as exc:
            self._discard(tmp)
            raise os_error(exc, "writing checkpoint", self.path / name) from exc
        pending = _LocalPending(self, name, tmp, tmp_fd)
        try:
            self._step("tmp_created")
        except BaseException:
            pending.discard()
            raise
        return pending

    def _relative(self, token: ReuseToken) -> str | None:
        prefix = self.root.rstrip("/") + "/"
        return token.path[len(prefix):] if token.path.startswith(prefix) else None

    def open_reused(self, token: ReuseToken) -> int | None:
        """The file ``token`` was issued for, opened below the directory, if unchanged."""
        rel = self._relative(token)
        if rel is None or self._dir_fd is None:
            return None
        return open_checked(self._dir_fd, rel, token, self._own)

    def can_reuse(self, token: ReuseToken, *, whole: bool = False) -> bool:
        # Whole or as a prefix alike: a link falls back to a (kernel-side) copy.
        fd = self.open_reused(token)
        if fd is None:
            return False
        os.close(fd)
        return True

    def _create(self, dir_fd: int, name: str, data: bytes) -> None:
        """Create ``name`` in ``dir_fd`` (never an existing file) holding ``data``, fsynced."""
        fd = os.open(name, _CREATE, _FILE_MODE, dir_fd=dir_fd)
        try:
            write_all(fd, [memoryview(data)])
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _install(self, tmp: str, name: str) -> None:
        """Put the finished temp directory ``tmp`` in place as ``name``; fsync the parent."""
        fd = self._fd
        old: str | None = tmp
        try:
            exchange(fd, tmp, name)
        except FileNotFoundError:
            old = None  # a first commit of this episode: nothing to swap with
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as exc:
            if exc.errno not in _NO_EXCHANGE:
                raise
            old = self._install_without_swap(tmp, name)
        self._step("renamed")
        if self.fsync:
            os.fsync(fd)
        self._step("parent_synced")
        if old is not None:
            # The new copy is durable in place: the old one (now at ``old``) goes the
            # way retention's deletions go. A failure leaves a leftover for the next
            # start, never a failed commit.
            trash = layout.trash_name(name)
            try:
                os.rename(old, trash, src_dir_fd=fd, dst_dir_fd=fd)
            except OSError:
                return
            self._step("old_copy_trashed")
            self._discard(trash)
            self._step("old_copy_removed")

    def _install_without_swap(self, tmp: str, name: str) -> str | None:
        fd = self._fd
        try:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            return None
        # Not atomic for readers: name is missing until the second rename. A crash in
        # between leaves the old copy in .replaced-*, which open() puts back.
        aside = layout.replaced_name(name)
        os.rename(name, aside, src_dir_fd=fd, dst_dir_fd=fd)
        try:
            self._step("old_moved_aside")
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(aside, name, src_dir_fd=fd, dst_dir_fd=fd)
            raise
        return aside

    # -- pointer ---------------------------------------------------------------------

    def replace_pointer(self, name: str, pointer_json: bytes, *,
                        pointer: str = layout.LATEST_LINK) -> None:
        fd = self._fd
        json_name = _POINTER_JSON[pointer]
        link_tmp = layout.temp_name(pointer)
        json_tmp = layout.temp_name(json_name)
        try:
            os.symlink(name, link_tmp, dir_fd=fd)
            os.replace(link_tmp, pointer, src_dir_fd=fd, dst_dir_fd=fd)
            self._step(f"{pointer}_link_replaced")
            self._create(fd, json_tmp, pointer_json)
            os.replace(json_tmp, json_name, src_dir_fd=fd, dst_dir_fd=fd)
            self._step(f"{pointer}_json_replaced")
            if self.fsync:
                os.fsync(fd)
            self._step("pointer_synced" if pointer == layout.LATEST_LINK else f"{pointer}_synced")
        except BaseException as exc:
            # ENOSPC on latest.json (its first page) used to leave its temp file behind.
            for leftover in (link_tmp, json_tmp):
                with contextlib.suppress(OSError):
                    os.unlink(leftover, dir_fd=fd)
            if isinstance(exc, OSError):
                raise os_error(exc, f"updating the {pointer} pointer in", self.root) from exc
            raise

    def remove_pointer(self, pointer: str) -> None:
        fd = self._fd
        try:
            # The JSON first: readers follow the symlink first, so until it goes too they
            # still find the checkpoint it names (whole: retention spares it until now).
            for entry, step in ((_POINTER_JSON[pointer], f"{pointer}_json_removed"),
                                (pointer, f"{pointer}_link_removed")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=fd)
                self._step(step)
            if self.fsync:
                os.fsync(fd)
            self._step(f"{pointer}_synced")
        except OSError as exc:
            raise os_error(exc, f"removing the {pointer} pointer in", self.root) from exc

    # -- deletion --------------------------------------------------------------------

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
            self._remove(trash)
            self._step("deleted")
        except OSError as exc:
            raise os_error(exc, "removing deleted checkpoint", self.path / trash) from exc

    def _to_trash(self, name: str) -> str:
        trash = layout.trash_name(name)
        os.rename(name, trash, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        return trash

    def _discard(self, name: str) -> None:
        # Cleanup after a failure must not mask it: on a read-only filesystem even
        # unlinking a missing temp dir fails (EROFS). A next writer start removes leftovers.
        with contextlib.suppress(OSError, StorageError):
            self._remove(name)

    def _remove(self, name: str) -> None:
        """Remove entry ``name`` and its tree: links unlinked, never followed."""
        remove_entry(self._fd, name, lambda d, n, st: unlink_recorded(d, n, st, self._own))


class _LocalPending:
    """A checkpoint being written into its temp directory (held open as ``tmp_fd``)."""

    def __init__(self, storage: LocalStorage, name: str, tmp: str, tmp_fd: int) -> None:
        self.name = name
        self._s = storage
        self._tmp = tmp
        self._tmp_fd: int | None = tmp_fd
        self._final = storage.path / name

    @property
    def _fd(self) -> int:
        if self._tmp_fd is None:
            raise StorageError(f"checkpoint {self._final} is already finalized or discarded")
        return self._tmp_fd

    def write(self, files: Sequence[FileSpec]) -> dict[str, ReuseToken]:
        tokens: dict[str, ReuseToken] = {}
        try:
            for spec in files:
                tokens[spec.name] = self._write_one(spec)
        except OSError as exc:
            raise os_error(exc, "writing checkpoint", self._final) from exc
        return tokens

    def _write_one(self, spec: FileSpec) -> ReuseToken:
        src = None
        if spec.reuse is not None:
            src = self._s.open_reused(spec.reuse)
            if src is None:
                raise OSError(errno.ESTALE, "the previous file changed on disk", spec.reuse.path)
        try:
            rel = self._s._relative(spec.reuse) if spec.reuse is not None else None
            if src is not None and rel is not None and not spec.data and \
                    link_checked(self._s._fd, rel, src, self._fd, spec.name, self._s._own):
                # No byte written: the tmp directory's fsync makes the new name durable.
                st = os.stat(spec.name, dir_fd=self._fd, follow_symlinks=False)
            else:
                st = self._create_one(spec, src)
        finally:
            if src is not None:
                os.close(src)
        # Renaming the directory keeps each file's inode, mtime and ctime: the token
        # holds for the final path. (Stat taken after our own link: its ctime.)
        return ReuseToken(str(self._final / spec.name), st.st_size, token_ident(st))

    def _create_one(self, spec: FileSpec, src: int | None) -> os.stat_result:
        fd = os.open(spec.name, _CREATE, _FILE_MODE, dir_fd=self._fd)
        try:
            if src is not None and spec.reuse is not None:
                copy_prefix(src, fd, spec.reuse.nbytes, spec.reuse.path)
            write_all(fd, spec.data, writeback=self._s.fsync)
            if self._s.fsync:
                os.fsync(fd)
            return os.fstat(fd)
        finally:
            os.close(fd)

    def finalize(self, marker: bytes) -> str:
        s = self._s
        try:
            s._create(self._fd, layout.RUNTIME_JSON, marker)
            s._step("runtime_written")
            if s.fsync:
                os.fsync(self._fd)
            s._step("tmp_dir_synced")
            s._install(self._tmp, self.name)
        except OSError as exc:
            raise os_error(exc, "writing checkpoint", self._final) from exc
        finally:
            self._close()
        return str(self._final)

    def _close(self) -> None:
        fd, self._tmp_fd = self._tmp_fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        # After a swap the temp name holds the old copy, which goes too: ep_N is whole.
        self._close()
        self._s._discard(self._tmp)
