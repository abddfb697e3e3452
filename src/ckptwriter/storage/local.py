"""The local POSIX backend: the read and write primitives of storage/base.py.

Protocol (DESIGN.md): every file goes into ``.tmp-ep_N-<random>/``, ``runtime.json``
last, and the next ``latest.json`` beside it as a temp file; all of them and the temp
directory are fsynced together (storage/local_background.py) before the temp
directory is renamed to ``ep_N`` (swapped with the old ``ep_N`` in one step when the
episode is committed again); the parent is fsynced. Only then are ``latest`` (a relative
symlink renamed over the old one) and ``latest.json`` (the synced temp file, renamed)
replaced, and the parent fsynced again; ``best`` and ``best.json`` move the same way,
next, when a commit beats the best score. Deletion renames to ``.trash-*`` first so a
checkpoint vanishes in one step; its files are removed in the background.

Everything the writer creates, renames or removes is reached through the directory
descriptor opened (and locked) at :meth:`LocalStorage.open`, never through a path
(storage/dirfd.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .. import layout
from ..errors import StorageError
from .base import ReuseToken
from .dirfd import exchange, identity, open_dir, remove_entry
from .local_background import FsyncBatch, Reaper
from .local_leftovers import clean_leftovers
from .local_lock import DirectoryLock, lock_directory
from .local_pending import CREATE, FILE_MODE, LocalPending
from .local_prepare import Ahead
from .local_reuse import OwnChanges, open_checked, unlink_recorded
from .local_store import LocalStore
from .posix_io import os_error, write_all

__all__ = ["LocalStorage", "LocalStore"]

# Never world-writable, whatever the umask: the umask still narrows it further.
_DIR_MODE = 0o775
# What renameat2(RENAME_EXCHANGE) answers where the filesystem or kernel has no swap.
_NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_POINTER_JSON = {layout.LATEST_LINK: layout.LATEST_JSON, layout.BEST_LINK: layout.BEST_JSON}

log = logging.getLogger("ckptwriter")


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

    spares = False  # deleted memory files kept as spares: the writer process's only

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
        self._reaper = Reaper(self._reap)
        # The next latest.json, written and synced with a checkpoint's files: (the
        # checkpoint it names, its bytes, its temp name in the directory).
        self._staged: tuple[str, bytes, str] | None = None
        self._pid = os.getpid()
        self._ahead = Ahead()  # the next commit's memory prefix (local_prepare.py)

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
                                        mode=FILE_MODE)
            self._check_in_place("opening", self.root)
            clean_leftovers(self._dir_fd, self.path, is_whole)
            self._pid = os.getpid()
            self._ahead = Ahead()  # of this process
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
        # Every removal finishes under the lock: none may run in a directory another
        # writer has opened since.
        for msg in self._reap_errors(self._reaper.stop()):
            log.warning("%s; the next writer to open the directory removes them", msg)
        self._unstage()
        self._ahead.drop(self._dir_fd)
        self._ahead.drop_spare(self._dir_fd)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- commit ----------------------------------------------------------------------

    def begin(self, name: str) -> LocalPending:
        fd = self._fd
        self._check_in_place("writing checkpoint", self.path / name)
        self._unstage()  # a commit whose pointer never moved
        tmp = layout.temp_name(name)
        try:
            os.mkdir(tmp, _DIR_MODE, dir_fd=fd)
            tmp_fd = open_dir(tmp, fd)
        except OSError as exc:
            self._discard(tmp)
            raise os_error(exc, "writing checkpoint", self.path / name) from exc
        pending = LocalPending(self, name, tmp, tmp_fd)
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

    @property
    def prepares(self) -> bool:
        return self._ahead.clones is not True

    def prepare_prefix(self, token: ReuseToken, stop: Callable[[], bool]) -> float | None:
        if (src := self.open_reused(token)) is None:
            return None
        try:
            return self._ahead.prepare(self._fd, src, token, fsync=self.fsync, stop=stop)
        except Exception:  # closed meanwhile, moved: only an optimization
            return None
        finally:
            os.close(src)

    def _create(self, dir_fd: int, name: str, data: bytes,
                batch: FsyncBatch | None = None) -> None:
        """Create ``name`` in ``dir_fd`` (never an existing file) holding ``data``, fsynced
        now, or by ``batch``."""
        fd = os.open(name, CREATE, FILE_MODE, dir_fd=dir_fd)
        try:
            write_all(fd, [memoryview(data)])
        except BaseException:
            os.close(fd)
            raise
        if batch is not None:
            batch.add(fd)
            return
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _batch(self) -> FsyncBatch:
        return FsyncBatch(self.fsync)

    def _stage(self, name: str, pointer_json: bytes, batch: FsyncBatch) -> None:
        """Write the ``latest.json`` that will name ``name``, synced by ``batch``."""
        self._unstage()
        tmp = layout.temp_name(layout.LATEST_JSON)
        # Named as staged before it exists: a failure part-way (ENOSPC) unlinks it too.
        self._staged = (name, pointer_json, tmp)
        self._create(self._fd, tmp, pointer_json, batch)

    def _unstage(self) -> None:
        staged, self._staged = self._staged, None
        # A forked child's copy names the parent's file, which the parent will rename.
        if staged is not None and self._dir_fd is not None and os.getpid() == self._pid:
            with contextlib.suppress(OSError):
                os.unlink(staged[2], dir_fd=self._dir_fd)

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
        # The latest.json this commit staged (written and synced with its files), if
        # it is the one asked for; any other staged one is stale.
        staged = self._staged
        if staged is not None and (pointer, *staged[:2]) != (layout.LATEST_LINK, name,
                                                             pointer_json):
            self._unstage()
            staged = None
        self._staged = None
        json_tmp = staged[2] if staged is not None else layout.temp_name(json_name)
        try:
            os.symlink(name, link_tmp, dir_fd=fd)
            os.replace(link_tmp, pointer, src_dir_fd=fd, dst_dir_fd=fd)
            self._step(f"{pointer}_link_replaced")
            if staged is None:
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
            # The checkpoint is gone for readers once renamed; its files are removed
            # beside the next commit (settle() reports a removal that failed).
            self._step("trash_renamed")
        except FileNotFoundError:
            return  # already gone: nothing to delete
        except OSError as exc:
            raise os_error(exc, "deleting checkpoint", self.path / name) from exc
        # Its memory file may be the next copy's spare (local_prepare.keep_spare).
        if self.spares and (ino := self._ahead.keep(self._fd, trash)) is not None:
            self._own.forget(ino)
        try:
            self._reaper.submit(trash)
        except RuntimeError:  # closing: removed now
            self._reap(trash)

    def _reap(self, trash: str) -> None:
        self._remove(trash)
        self._step("deleted")

    def settle(self, *, wait: bool) -> tuple[bool, list[str]]:
        running, failed = self._reaper.settle(wait=wait)
        spared = wait and self._ahead.drop_spare(self._dir_fd)  # space wanted: given back
        return running or spared, self._reap_errors(failed)

    def _reap_errors(self, failed: list[tuple[str, BaseException]]) -> list[str]:
        where = "removing the files of a deleted checkpoint"
        return [str(os_error(exc, where, self.path / trash)) if isinstance(exc, OSError)
                else f"{exc!r} while {where} {self.path / trash}" for trash, exc in failed]

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
