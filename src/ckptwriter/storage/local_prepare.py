"""The next commit's memory prefix, copied while the writer would otherwise be idle.

On a filesystem that cannot clone (ext4, tmpfs), an incremental commit copies the
whole previous memory file before it appends the delta: for a large memory most of a
commit. Right after a commit, the next one's prefix is known (the file just written),
while its snapshot is not taken yet, so the copy is made then (:func:`copy_ahead`),
beside the checkpoints, in a ``.tmp-next-*`` file, or over a ``.tmp-spare-*`` (below):
a leftover like any ``.tmp-*`` if a crash leaves it. The next commit that extends
exactly that file (same reuse token) renames the copy into its temp directory and only
appends; any other commit drops it before it writes anything. The writer takes the next
snapshot once the copy is on the disk (``on_backlog="coalesce"``), so that snapshot is
as fresh as it can be when its commit starts, and is durable one short commit later.

The spare is the memory file of the checkpoint retention deleted last
(:func:`keep_spare`): overwriting blocks and cached pages a file already has costs the
copy about 40 % less CPU than a new file, and saves the deletion's discard (ext4
mounted with ``discard``). It is reused only if nothing else can see its bytes change.

A copy that fails (out of space, a fault) or is stopped (the writer is closing) is
removed and costs nothing but the attempt: the next commit copies as it always did.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from .. import layout
from .base import ReuseToken
from .dirfd import open_dir
from .posix_io import CREATE, FICLONE, FILE_MODE, Writeback, copy_prefix, libc_function

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["Ahead", "PreparedPrefix", "copy_ahead", "discard", "keep_spare"]

# What fallocate(2) answers where the filesystem has none: then blocks come as written.
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


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
    if spare is not None:
        # The deletion that freed it and its move out are durable before a block of it
        # changes: a power loss never brings the deleted checkpoint back altered.
        try:
            os.fsync(dir_fd)
        except OSError:
            discard(dir_fd, spare, None)
            spare = None
    fd = _open_spare(dir_fd, spare) if spare is not None else None
    recycled = fd is not None
    name = spare if recycled and spare is not None else layout.temp_name("next")
    if fd is None:
        fd = os.open(name, CREATE, FILE_MODE, dir_fd=dir_fd)
    try:
        if recycled and os.fstat(fd).st_size > token.nbytes:
            os.ftruncate(fd, token.nbytes)
        _allocate(fd, token.nbytes)
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
                # memory files is that of the files retention keeps.
                _release(src_fd, token.nbytes)
    except BaseException:
        discard(dir_fd, name, fd)
        raise
    if not done:
        discard(dir_fd, name, fd)
        return None
    return PreparedPrefix(token, name, fd, time.perf_counter() - t0, os.getpid())


@cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """fallocate(2) itself: glibc's posix_fallocate writes a byte per block where the
    filesystem has none (NFS < 4.2), slowly and through a write-only fd not at all."""
    # fallocate64: 64-bit offsets on 32-bit systems too (the same call on 64-bit ones).
    args = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn: Callable[[int, int, int, int], int] | None = \
        libc_function("fallocate64", args) or libc_function("fallocate", args)
    return fn


def _allocate(fd: int, nbytes: int) -> None:
    """Its blocks in one allocation, not one per piece written back: a quarter less CPU
    for the copy on ext4 (``python -m benchmarks.copy_ahead``); no space, no copy."""
    call = _fallocate()
    if call is not None and call(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err not in _NO_FALLOCATE:
            raise OSError(err, os.strerror(err))


def keep_spare(dir_fd: int, trash: str) -> tuple[str, int] | None:
    """Move the memory file of the deleted checkpoint ``trash`` out, as a spare for the
    next copy to overwrite: its name and inode, or None if it may not be reused.

    Only a regular file of ours with no other name (none outside the directory) that no
    one has open or mapped (a reader of the deleted checkpoint keeps its bytes): moved
    out first, so no one can reach it by a name any more, then tested with a write
    lease, which the kernel refuses while any descriptor or mapping has the file open
    (taken and given back at once: a break would signal this process, so only the
    writer process, which ignores SIGIO, keeps spares), and tested again right before
    it is overwritten. Refused, it is removed like the rest of the deleted checkpoint.
    """
    if fcntl is None or not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        tfd = open_dir(trash, dir_fd)
    except OSError:
        return None
    spare = None
    try:
        names = [n for n in os.listdir(tfd) if n.startswith("memory_") and n.endswith(".jsonl")]
        if len(names) != 1:
            return None
        fd = os.open(names[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=tfd)
        try:
            st = os.fstat(fd)
            if not _ours_alone(st):
                return None
            spare = layout.temp_name("spare")
            os.rename(names[0], spare, src_dir_fd=tfd, dst_dir_fd=dir_fd)
            moved = os.stat(spare, dir_fd=dir_fd, follow_symlinks=False)
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
                raise OSError(errno.ESTALE, "the file changed while it was moved")
            _lease_test(fd)
            return spare, st.st_ino
        finally:
            os.close(fd)
    except OSError:
        if spare is not None:
            discard(dir_fd, spare, None)  # moved out, then refused: removed here
        return None
    finally:
        os.close(tfd)


def _lease_test(fd: int) -> None:
    """Raise (EAGAIN) if any other descriptor or mapping has the file open: a write lease
    is granted only then (and given back at once)."""
    assert fcntl is not None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def _ours_alone(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def _open_spare(dir_fd: int, spare: str) -> int | None:
    """The spare opened for overwriting, if it is still ours alone; else removed."""
    fd = None
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        if _ours_alone(os.fstat(fd)):
            # Tested again right before it is overwritten: an open that had found the
            # file by its old name just before it was moved has completed by now.
            _lease_test(fd)
            return fd
    except OSError:
        pass
    discard(dir_fd, spare, fd)
    return None


def _clones(dir_fd: int, src_fd: int) -> bool:
    """Whether a file in ``dir_fd`` can be a clone of ``src_fd`` (tried for real)."""
    if fcntl is None:
        return False
    name = layout.temp_name("probe")
    try:
        fd = os.open(name, CREATE, FILE_MODE, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, FICLONE, src_fd)
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
    the spare file of a deleted checkpoint the next copy overwrites.

    Used by one thread at a time (the commit's); a forked child closes its copies.
    """

    def __init__(self) -> None:
        self.next: PreparedPrefix | None = None
        # Whether the filesystem clones (XFS reflink, btrfs), once a copy was asked for.
        self.clones: bool | None = None
        # Spares are kept only once copies ahead are made.
        self.recycle = False
        self._spare: str | None = None
        self._pid = os.getpid()
        _LIVE.add(self)

    def prepare(self, dir_fd: int, src_fd: int, token: ReuseToken, *, fsync: bool,
                stop: Callable[[], bool]) -> float | None:
        self.drop(dir_fd)
        if self.clones is None:
            self.clones = _clones(dir_fd, src_fd)
        if self.clones:
            return None  # the commit's own copy is a clone: nothing to do ahead
        self.recycle = True
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

    def keep(self, dir_fd: int, trash: str) -> int | None:
        """Keep the memory file of the just deleted ``trash`` as the spare (if none is
        kept yet and copies ahead are made); its inode, whose names are all gone."""
        if not self.recycle or self._spare is not None or os.getpid() != self._pid:
            return None
        kept = keep_spare(dir_fd, trash)
        if kept is None:
            return None
        self._spare = kept[0]
        return kept[1]

    def drop_spare(self, dir_fd: int | None) -> bool:
        """Remove the spare (its space is wanted); whether there was one."""
        spare, self._spare = self._spare, None
        if spare is None or os.getpid() != self._pid:
            return False
        discard(dir_fd, spare, None)
        return True

    def forked(self) -> None:
        """In a forked child: the copies are the parent's; close ours of them."""
        if self.next is not None:
            with contextlib.suppress(OSError):
                os.close(self.next.fd)
        self.next, self._spare = None, None


_LIVE: weakref.WeakSet[Ahead] = weakref.WeakSet()


def _forget_in_forked_child() -> None:
    for ahead in list(_LIVE):
        ahead.forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_forked_child)
