"""The next commit's memory prefix, copied while the writer would otherwise be idle.

On a filesystem that cannot clone (ext4, tmpfs), an incremental commit copies the
whole previous memory file before it appends the delta: for a large memory most of a
commit. Right after a commit, the next one's prefix is known (the file just written),
while its snapshot is not taken yet, so the copy is made then (:func:`copy_ahead`),
beside the checkpoints, as ``.tmp-next-<random>``: a leftover like any ``.tmp-*`` if a
crash leaves it. The next commit that extends exactly that file (same reuse token)
renames it into its temp directory and only appends; any other commit leaves it, and it
is removed when that commit ends. The writer takes the next snapshot once the copy is
done (``on_backlog="coalesce"``), so that snapshot is as fresh as it can be when its
commit starts, and is durable one short commit later.

A copy that fails (out of space, a fault) or is stopped (the writer is closing) is
removed and costs nothing but the attempt: the next commit copies as it always did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from .base import ReuseToken
from .dirfd import open_dir
from .posix_io import CREATE, FILE_MODE, Writeback, copy_prefix

__all__ = ["PreparedPrefix", "copy_ahead", "discard", "keep_spare"]


@dataclass(slots=True)
class PreparedPrefix:
    """A copy of the file ``token`` names, open for appending, in the checkpoints dir."""

    token: ReuseToken
    name: str
    fd: int
    seconds: float
    pid: int


def copy_ahead(dir_fd: int, src_fd: int, token: ReuseToken, *, fsync: bool,
               stop: Callable[[], bool], spare: str | None = None) -> PreparedPrefix | None:
    """Copy ``token``'s bytes from ``src_fd`` into a ``.tmp-*`` of ``dir_fd``: over the
    ``spare`` (:func:`keep_spare`) if there is one, else a new file.

    Returns None if ``stop`` said stop first (nothing is left behind).

    Raises:
        OSError: the copy failed (nothing is left behind).
    """
    t0 = time.perf_counter()
    fd = _open_spare(dir_fd, spare) if spare is not None else None
    name = spare if fd is not None and spare is not None else layout.temp_name("next")
    recycled = fd is not None
    if fd is None:
        if spare is not None:
            discard(dir_fd, spare, None)
        fd = os.open(name, CREATE, FILE_MODE, dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_size > token.nbytes:
            os.ftruncate(fd, token.nbytes)
        if hasattr(os, "posix_fallocate"):
            # Its blocks in one allocation, not one per piece written back: a quarter
            # less CPU for the copy on ext4 (docs/PERFORMANCE.md), and no space, no copy.
            try:
                os.posix_fallocate(fd, 0, token.nbytes)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        wb = Writeback(fd, token.nbytes) if fsync else None
        done = copy_prefix(src_fd, fd, token.nbytes, token.path, wb, stop=stop)
        if done and wb is not None:
            # On the disk before the next snapshot is taken: its commit's fsync then
            # writes the delta and the metadata only, a short and steady wait.
            wb.settle(stop)
            if not recycled:
                # As a commit's own copy does (local_pending): the source's pages go
                # back, for this copy's successor to reuse. Not when a deleted file is
                # recycled: its pages are reused in place, and the page cache of the
                # files retention keeps is bounded by them.
                _release(src_fd, token.nbytes)
    except BaseException:
        discard(dir_fd, name, fd)
        raise
    if not done:
        discard(dir_fd, name, fd)
        return None
    return PreparedPrefix(token, name, fd, time.perf_counter() - t0, os.getpid())


def keep_spare(dir_fd: int, trash: str) -> str | None:
    """Move the memory file out of the deleted checkpoint ``trash`` as a spare for the
    next copy to overwrite; its name, or None if it may not be reused.

    Overwriting blocks a file already has costs the next copy a third of the CPU of
    allocating new ones, and the deletion's discard is saved too (ext4 mounted with
    ``discard``). Reused only if nothing else can see the bytes change: a regular file
    of ours with no other link (no name outside the directory), open nowhere else (a
    reader of the deleted checkpoint keeps its bytes: the write lease is refused then).
    """
    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        tfd = open_dir(trash, dir_fd)
    except OSError:
        return None
    try:
        names = [n for n in os.listdir(tfd) if n.startswith("memory_") and n.endswith(".jsonl")]
        if len(names) != 1:
            return None
        fd = os.open(names[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=tfd)
        try:
            if not _ours_alone(fd):
                return None
            # Granted only while no other descriptor or mapping has the file open;
            # held across the rename, so no one can open it in between.
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
            try:
                spare = layout.temp_name("spare")
                os.rename(names[0], spare, src_dir_fd=tfd, dst_dir_fd=dir_fd)
            finally:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            return spare
        finally:
            os.close(fd)
    except OSError:
        return None  # refused, not ours: removed with the rest
    finally:
        os.close(tfd)


def _ours_alone(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def _open_spare(dir_fd: int, spare: str) -> int | None:
    """The spare opened for overwriting, if it is still ours alone; else removed."""
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    if _ours_alone(fd):
        return fd
    discard(dir_fd, spare, fd)
    return None


_FICLONE = 0x40049409  # Linux: the destination shares the source's extents


def _clones(dir_fd: int, src_fd: int) -> bool:
    """Whether a file in ``dir_fd`` can be a clone of ``src_fd`` (tried for real)."""
    name = layout.temp_name("probe")
    try:
        fd = os.open(name, CREATE, FILE_MODE, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, _FICLONE, src_fd)
    except OSError:
        return False
    else:
        return True
    finally:
        discard(dir_fd, name, fd)


def _release(fd: int, nbytes: int) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # only a hint
            os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)


def discard(dir_fd: int | None, name: str, fd: int | None) -> None:
    """Close and remove a copy (errors ignored: a leftover the next open removes)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if dir_fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


class Ahead:
    """What a local backend holds for its next commit: the prefix copied ahead, and
    the spare file of a deleted checkpoint the next copy overwrites."""

    def __init__(self) -> None:
        self.next: PreparedPrefix | None = None
        # Whether the filesystem clones (XFS reflink, btrfs), once a copy was asked for.
        self.clones: bool | None = None
        # Kept only once copies ahead are made (the reaper thread sets it).
        self.recycle = False
        self._spare: str | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def prepare(self, dir_fd: int, src_fd: int, token: ReuseToken, *, fsync: bool,
                stop: Callable[[], bool]) -> float | None:
        self.drop(dir_fd)
        if self.clones is None:
            self.clones = _clones(dir_fd, src_fd)
        if self.clones:
            return None  # the commit's own copy is a clone: nothing to do ahead
        self.recycle = True
        with self._lock:
            spare, self._spare = self._spare, None
        try:
            self.next = copy_ahead(dir_fd, src_fd, token, fsync=fsync, stop=stop,
                                   spare=spare)
        except OSError:
            return None  # out of space, a fault: the next commit copies, as without it
        return self.next.seconds if self.next is not None else None

    def take(self, token: ReuseToken) -> PreparedPrefix | None:
        """The prefix copied ahead, if it is ``token``'s (then the caller's to keep)."""
        ready = self.next
        if ready is None or ready.token != token or ready.pid != os.getpid():
            return None
        self.next = None
        return ready

    def drop(self, dir_fd: int | None) -> None:
        """Remove the prefix copied ahead (a fork's copy names the parent's: left)."""
        ready, self.next = self.next, None
        if ready is not None:
            discard(dir_fd if ready.pid == os.getpid() else None, ready.name, ready.fd)

    def keep(self, dir_fd: int, trash: str) -> None:
        """From the reaper's thread, before it removes ``trash``: keep a spare."""
        with self._lock:
            if self.recycle and self._spare is None:
                self._spare = keep_spare(dir_fd, trash)

    def drop_spare(self, dir_fd: int | None) -> bool:
        """Remove the spare (its space is wanted); whether there was one."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None or os.getpid() != self._pid:
            return False
        discard(dir_fd, spare, None)
        return True
