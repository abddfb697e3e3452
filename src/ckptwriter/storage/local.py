"""Atomic checkpoint commit on a POSIX filesystem.

Protocol (DESIGN.md): every file goes into ``.tmp-ep_N-<random>/`` and is fsynced,
``runtime.json`` last; the temp directory is fsynced and renamed to ``ep_N``; the parent
is fsynced. Only then are ``latest`` (a relative symlink renamed over the old one) and
``latest.json`` (temp file, fsync, rename) replaced, and the parent fsynced again.
Deletion renames to ``.trash-*`` first so a checkpoint vanishes in one step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

from .. import layout
from ..errors import DirectoryLockedError, StorageError
from ..manifest import commit_documents
from ..retention import CheckpointRecord
from ..snapshot import CapturedSnapshot
from .base import CommitOutcome, MemoryState

__all__ = ["LocalStorage"]

# Never world-writable, whatever the umask: the umask still narrows these further.
_FILE_MODE = 0o664
_DIR_MODE = 0o775
# Linux caps one writev at IOV_MAX (1024) buffers.
_IOV_MAX = 1024
# Above this size, hashing runs in another thread while this one writes and fsyncs:
# both release the GIL.
_PARALLEL_HASH_BYTES = 8 * 1024 * 1024


def _os_error(exc: OSError, action: str, path: Path | str) -> StorageError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = {
        errno.ENOSPC: "free disk space or point checkpoint_dir at a larger disk",
        errno.EDQUOT: "free quota or point checkpoint_dir at another disk",
        errno.EACCES: "check the directory's permissions",
        errno.EPERM: "check the directory's permissions",
        errno.EROFS: "the filesystem is read-only; point checkpoint_dir at a writable disk",
        errno.ENOENT: "the checkpoints directory was removed while the run was going",
    }.get(exc.errno or 0, "check the disk and the path")
    return StorageError(f"{reason} while {action} {path} [errno {exc.errno}]: {hint}")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creates, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views`` to a blocking fd, resuming after partial writes."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        # Partial writes happen near ENOSPC and on signals: resume where it stopped.
        while n:
            head = views[i]
            if n >= len(head):
                n -= len(head)
                i += 1
            else:
                views[i] = head[n:]
                n = 0


def _hash_views(sha: hashlib._Hash, views: list[memoryview]) -> None:
    for v in views:
        sha.update(v)


# copy_file_range is refused by some filesystems and sandboxes (FUSE, gVisor, seccomp,
# cross-device): fall back to an ordinary copy rather than failing every checkpoint.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM}
_COPY_CHUNK = 4 * 1024 * 1024


def _copy_prefix(src: str, dst_fd: int, nbytes: int) -> None:
    with open(src, "rb") as f:
        src_fd = f.fileno()
        copied = 0
        try:
            while copied < nbytes:
                n = os.copy_file_range(src_fd, dst_fd, nbytes - copied, copied, copied)
                if n == 0:
                    raise OSError(errno.EIO, f"{src} is shorter than expected")
                copied += n
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in _NO_KERNEL_COPY:
                raise
            while copied < nbytes:
                chunk = os.pread(src_fd, min(_COPY_CHUNK, nbytes - copied), copied)
                if not chunk:
                    raise OSError(errno.EIO, f"{src} is shorter than expected") from None
                os.pwrite(dst_fd, chunk, copied)
                copied += len(chunk)
    os.lseek(dst_fd, nbytes, os.SEEK_SET)


def can_extend(prev: MemoryState | None, log_id: str, nbytes: int) -> bool:
    """True if the previous memory file is exactly what the new one starts with."""
    if prev is None or prev.log_id != log_id or prev.nbytes > nbytes:
        return False
    try:
        st = os.stat(prev.location)
    except OSError:
        return False
    return (st.st_size, st.st_ino, st.st_mtime_ns) == (prev.nbytes, prev.ino, prev.mtime_ns)


class LocalStorage:
    """A checkpoints directory on a local POSIX filesystem.

    Args:
        root: the checkpoints directory (created if missing).
        fsync: make each commit durable before ``latest`` moves. Turning it off keeps
            atomicity (rename) but a power loss may lose recent checkpoints.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        # Fixed now: a later chdir must not send checkpoints somewhere else.
        self.root = Path(os.path.abspath(root))
        self.location = str(self.root)
        self.fsync = fsync
        # Named in DirectoryLockedError: the process a user would stop. The writer
        # process sets it to its training process.
        self.owner = f"pid {os.getpid()}"
        self._lock_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> list[CheckpointRecord]:
        from ..resume import scan_checkpoints

        try:
            layout.make_dirs(self.root)
        except FileExistsError as exc:
            raise StorageError(
                f"checkpoint_dir {self.root} exists and is not a directory; "
                "point checkpoint_dir at a directory"
            ) from exc
        except OSError as exc:
            raise _os_error(exc, "creating checkpoint_dir", self.root) from exc
        self._lock()
        try:
            for entry in sorted(os.listdir(self.root)):
                if layout.is_leftover(entry) and not self._restore(entry):
                    self._remove_tree(self.root / entry)
            return [i.record for i in scan_checkpoints(self.root) if i.complete]
        except OSError as exc:
            self.close()
            raise _os_error(exc, "opening", self.root) from exc
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        path = self.root / layout.LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise _os_error(exc, "creating the lock file", path) from exc
        try:
            # flock dies with its process, so a crashed writer never leaves a stale lock.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise DirectoryLockedError(
                f"Checkpoint directory {self.root} is locked by another writer ({owner}). "
                "Only one writer may own a checkpoints directory: stop the other run or "
                "use another checkpoint_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.owner} on {os.uname().nodename}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # Protocol steps, in order; tests override _step to crash right after any of them.
    STEPS = (
        "tmp_created", "memory_written", "files_written", "runtime_written",
        "tmp_dir_synced", "renamed", "parent_synced", "latest_link_replaced",
        "latest_json_replaced", "pointer_synced", "trash_renamed", "deleted",
    )

    def _step(self, name: str) -> None:
        """Called right after each protocol step; a no-op outside fault-injection tests."""

    # -- commit ----------------------------------------------------------------------

    def commit(self, snap: CapturedSnapshot, prev: MemoryState | None) -> CommitOutcome:
        name = layout.checkpoint_name(snap.episode_index)
        tmp = self.root / layout.temp_name(name)
        try:
            return self._commit(snap, prev, name, tmp)
        except OSError as exc:
            self._discard(tmp)
            raise _os_error(exc, "writing checkpoint", tmp.with_name(name)) from exc
        except BaseException:
            self._discard(tmp)
            raise

    def _commit(
        self, snap: CapturedSnapshot, prev: MemoryState | None, name: str, tmp: Path
    ) -> CommitOutcome:
        t0 = time.perf_counter()
        os.mkdir(tmp, _DIR_MODE)
        self._step("tmp_created")
        files: dict[str, dict[str, object]] = {}
        mem = snap.memory
        mem_name = layout.memory_file_name(snap.episode_index)
        incremental = can_extend(prev, mem.log_id, mem.nbytes)
        serialize_s = 0.0
        start = 0
        fd = os.open(tmp / mem_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     _FILE_MODE)
        try:
            if incremental:
                assert prev is not None
                sha = prev.sha.copy()
                start = prev.nbytes
                _copy_prefix(prev.location, fd, start)
            else:
                sha = hashlib.sha256()
            views = list(mem.iter_bytes(start))
            delta = mem.nbytes - start
            if delta >= _PARALLEL_HASH_BYTES:
                # Hash on the other core during the whole write + fsync, not only the
                # fsync: a full write then costs what a raw write + fsync costs (target 4).
                hasher = threading.Thread(target=_hash_views, args=(sha, views),
                                          name="ckptwriter-hash")
                hasher.start()
                try:
                    write_all(fd, views)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    hasher.join()
            else:
                write_all(fd, views)
                for v in views:
                    sha.update(v)
                if self.fsync:
                    os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._step("memory_written")
        files[mem_name] = {"bytes": mem.nbytes, "sha256": sha.hexdigest()}
        mem_state = MemoryState(
            log_id=mem.log_id, entries=mem.entries, nbytes=mem.nbytes,
            location=str(self.root / name / mem_name), sha=sha,
            ino=st.st_ino, mtime_ns=st.st_mtime_ns,
        )
        written = mem.nbytes
        for fname, data in (("agent.json", snap.agent_json), *snap.extra_files.items()):
            self._write_file(tmp / fname, data)
            files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            written += len(data)
        self._step("files_written")
        s0 = time.perf_counter()
        runtime, latest_json = commit_documents(snap, name, mem_name, files)
        serialize_s += time.perf_counter() - s0
        self._write_file(tmp / layout.RUNTIME_JSON, runtime)
        written += len(runtime)
        self._step("runtime_written")
        if self.fsync:
            fsync_dir(tmp)
        self._step("tmp_dir_synced")
        final = self.root / name
        # Same episode written again (a retry, a resume into the same directory): the old
        # copy is moved aside only now and removed only once the new one is in place; a
        # crash in between leaves it in .replaced-*, which the next open() puts back.
        old = None
        if os.path.lexists(final):
            old = self.root / layout.replaced_name(name)
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            self._discard(old)
        self._step("renamed")
        if self.fsync:
            fsync_dir(self.root)
        self._step("parent_synced")
        total = time.perf_counter() - t0
        return CommitOutcome(
            name=name, path=str(final), bytes_written=written,
            entries_serialized=mem.entries - (prev.entries if incremental and prev else 0),
            bytes_serialized=delta, incremental=incremental,
            serialize_seconds=serialize_s, write_seconds=total - serialize_s,
            memory=mem_state,
            record=CheckpointRecord(name, snap.episode_index, snap.val_score),
            latest_json=latest_json,
        )

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            write_all(fd, [memoryview(data)])
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- pointer ---------------------------------------------------------------------

    def set_latest(self, outcome: CommitOutcome) -> None:
        link_tmp = self.root / layout.temp_name("latest")
        json_tmp = self.root / layout.temp_name("latest.json")
        try:
            os.symlink(outcome.name, link_tmp)
            os.replace(link_tmp, self.root / layout.LATEST_LINK)
            self._step("latest_link_replaced")
            self._write_file(json_tmp, outcome.latest_json)
            os.replace(json_tmp, self.root / layout.LATEST_JSON)
            self._step("latest_json_replaced")
            if self.fsync:
                fsync_dir(self.root)
            self._step("pointer_synced")
        except BaseException as exc:
            # ENOSPC on latest.json (its first page) used to leave its temp file behind.
            for leftover in (link_tmp, json_tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if isinstance(exc, OSError):
                raise _os_error(exc, "updating the latest pointer in", self.root) from exc
            raise

    # -- deletion --------------------------------------------------------------------

    def _restore(self, entry: str) -> bool:
        """Put back a checkpoint a crash left aside while a re-commit replaced it.

        Only ``.replaced-*``: ``.trash-*`` holds what retention deletes, which stays
        deleted (and may be half removed).
        """
        if not entry.startswith(layout.REPLACED_PREFIX):
            return False
        name = entry[len(layout.REPLACED_PREFIX) :].rpartition("-")[0]
        path = self.root / entry
        if layout.parse_checkpoint_name(name) is None or os.path.lexists(self.root / name):
            return False
        from ..errors import CheckpointError
        from ..resume import verify_checkpoint

        try:
            # Only a whole checkpoint comes back: a trash dir whose rmtree was killed
            # half-way still has runtime.json but not all its files (found by the torture).
            verify_checkpoint(path)
        except CheckpointError:
            return False
        os.rename(path, self.root / name)
        return True

    def delete(self, name: str) -> None:
        try:
            trash = self._to_trash(name)
        except FileNotFoundError:
            return  # already gone: nothing to delete
        except OSError as exc:
            raise _os_error(exc, "deleting checkpoint", self.root / name) from exc
        # The checkpoint is gone for readers once renamed. A failure to remove the trash
        # is still reported (a retention error), and the next pass finds the name gone.
        try:
            self._step("trash_renamed")
            self._remove_tree(trash)
            self._step("deleted")
        except OSError as exc:
            raise _os_error(exc, "removing deleted checkpoint", trash) from exc

    def _to_trash(self, name: str) -> Path:
        trash = self.root / layout.trash_name(name)
        os.rename(self.root / name, trash)
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
