"""Low-level POSIX file operations the local backend and the writer process share."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import StorageError

__all__ = ["COPY_CHUNK", "CREATE", "DIRECT_MIN_BYTES", "FICLONE", "FILE_MODE", "Writeback",
           "copy_prefix",
           "libc_function", "os_error", "refill_in_background", "write_all", "write_uncached"]

# Never world-writable, whatever the umask: the umask still narrows these further.
FILE_MODE = 0o664
# A new file only, never through a symlink, never kept open across exec.
CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Linux ioctl: the destination file shares the source's extents (a reflink).
FICLONE = 0x40049409

# Linux caps one writev at IOV_MAX (1024) buffers.
_IOV_MAX = 1024
# Bytes per writev at most: few calls, yet a stream still arriving (the writer process's
# hand-over) is written a slice at a time.
_BATCH_BYTES = 8 * 1024 * 1024


def os_error(exc: OSError, action: str, path: Path | str) -> StorageError:
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


# How much of a file is written before the kernel is asked to start writing it back: a
# sixteenth of the file, within 1 to 8 MiB. Each piece is two calls that release the GIL,
# and a thread executor beside a CPU-bound loop waits up to a switch interval to get it
# back: few pieces bound that; small ones leave the fsync little to wait for.
WRITEBACK_CHUNK = 1 << 20
_WRITEBACK_PIECES = 16
_SYNC_FILE_RANGE_WRITE = 2
# WAIT_BEFORE | WRITE | WAIT_AFTER: the range's pages are on the disk when it returns
# (its metadata is not: that is the fsync's).
_SYNC_FILE_RANGE_SETTLE = 1 | 2 | 4


def libc_function(name: str, argtypes: list[type[Any]]) -> Any | None:
    """The C library's ``name`` (errno kept for ``ctypes.get_errno``), returning an int,
    or None where there is no such library or function (calls ``os`` does not have)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


@cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (os has none), or None where there is no such call."""
    fn: Callable[[int, int, int, int], int] | None = libc_function(
        "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    return fn


class Writeback:
    """Starts the writeback of a file's pages each :attr:`chunk` written.

    Copy then ``fsync`` is serial: the disk idles while the pages are filled, then the
    fsync waits for all of them. Asking the kernel to write back each piece as soon as
    it is filled overlaps the two, and the ``fsync`` (still the durability point)
    waits for the tail only: 0.57 to 0.66x the time of copy then ``fsync`` on ext4, for
    11 and 112 MB (docs/PERFORMANCE.md). Nothing is done where the call is
    missing or refused (tmpfs ignores it; a clone has no dirty pages).
    """

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        self._fd = fd
        self.chunk = min(_BATCH_BYTES, max(WRITEBACK_CHUNK, size // _WRITEBACK_PIECES))
        self._started = offset
        self._end = offset
        self._call = _sync_file_range()

    def passed(self, nbytes: int) -> None:
        """``nbytes`` more are on the file without dirty pages (written past the cache)."""
        self._end += nbytes
        self._started = self._end

    def flush(self) -> None:
        """Start the writeback of what was written since the last piece started."""
        if self._call is not None and self._end > self._started:
            if self._call(self._fd, self._started, self._end - self._started,
                          _SYNC_FILE_RANGE_WRITE) != 0:
                self._call = None
            self._started = self._end

    def settle(self, stop: Callable[[], bool]) -> None:
        """Write every piece so far and wait until they are on the disk, a piece at a
        time, asking ``stop`` before each (then the rest is left to the fsync)."""
        self.flush()
        for at in range(0, self._end, self.chunk):
            if self._call is None or stop():
                return
            if self._call(self._fd, at, min(self.chunk, self._end - at),
                          _SYNC_FILE_RANGE_SETTLE) != 0:
                self._call = None

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` more were written, right after what was written before."""
        self._end += nbytes
        if self._call is not None and self._end - self._started >= self.chunk:
            if self._call(self._fd, self._started, self._end - self._started,
                          _SYNC_FILE_RANGE_WRITE) != 0:
                self._call = None  # refused here (EINVAL, ESPIPE...): only a hint
            self._started = self._end


def write_all(fd: int, views: Iterable[memoryview | bytes],
              writeback: Writeback | None = None) -> None:
    """Write every byte of ``views`` to a blocking fd, resuming after partial writes.

    ``views`` is read as it is written, a batch per call (at most :data:`_BATCH_BYTES`,
    or the ``writeback``'s chunk): bytes still arriving (the writer process's hand-over)
    are written as they come, not after the last. Each write is reported to
    ``writeback``, which starts the kernel writing it back.
    """
    limit = _BATCH_BYTES if writeback is None else writeback.chunk
    batch: list[memoryview] = []
    size = 0
    for v in views:
        if len(v):
            batch.append(memoryview(v))
            size += len(v)
        if size >= limit or len(batch) == _IOV_MAX:
            _writev_all(fd, batch)
            if writeback is not None:
                writeback.wrote(size)
            batch, size = [], 0
    _writev_all(fd, batch)
    if writeback is not None:
        writeback.wrote(size)


# A full write at least this large goes past the page cache where its buffers allow it
# (:func:`write_uncached`). Filling that much page cache on the commit's critical path
# costs the writer more CPU than the disk takes to write it (pages a VM has not used
# before cost several times more); the file is read back into it after the commit
# (:func:`refill_in_background`). Below it, the pages are cheap.
DIRECT_MIN_BYTES = 256 * 1024 * 1024
# O_DIRECT wants buffers, lengths and offsets aligned to the logical block size: a page
# covers every common device's.
_DIRECT_ALIGN = 4096
# Bytes per direct write: each waits for the device, and on the VM measured 4 MiB wrote
# 1 GiB faster than 1, 2, 8 or 16 MiB (0.44 s against 0.44 to 0.69 s).
_DIRECT_BATCH_BYTES = 4 * 1024 * 1024


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where it is refused (tmpfs before Linux
    6.6, FUSE, other systems)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        import fcntl
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return True


# How a filesystem that takes the O_DIRECT flag may still refuse a direct write: an
# alignment it wants larger (EINVAL), or no direct I/O after all (some FUSE daemons).
_DIRECT_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP}


def _aligned(view: memoryview) -> bool:
    if view.readonly or not view.c_contiguous or not view.nbytes \
            or view.nbytes % _DIRECT_ALIGN:
        return False
    holder = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(holder) % _DIRECT_ALIGN == 0
    finally:
        del holder


def write_uncached(fd: int, views: Iterable[memoryview | bytes],
                   writeback: Writeback | None = None) -> None:
    """Write ``views`` to a new, empty ``fd`` as :func:`write_all` does, the leading
    page-aligned ones with O_DIRECT: from those buffers to the disk, with neither a
    copy into the page cache nor its pages. From the first view that is not aligned
    (the last, short one) on, and wherever O_DIRECT is refused, the write is an
    ordinary one. The fsync that follows is still what makes the file durable (its
    size and extents, and the device's cache).
    """
    it = iter(views)
    try:
        left: list[memoryview] = []
        if _set_direct(fd, True):
            try:
                left = _direct_head(fd, it, writeback)
            finally:
                off = _set_direct(fd, False)
            if not off:
                # An fd that keeps O_DIRECT would refuse the unaligned rest: stop here.
                raise OSError(errno.EIO, "could not turn O_DIRECT off again")
        write_all(fd, itertools.chain(left, it), writeback)
    except BaseException:
        # A hand-over still being read (its read-ahead holds buffers) stops now, not
        # when this frame is let go of: a retry after ENOSPC reads it all again.
        close = getattr(it, "close", None)
        if close is not None:
            close()
        raise


def _direct_head(fd: int, it: Iterator[memoryview | bytes], writeback: Writeback | None,
                 ) -> list[memoryview]:
    """Write the leading aligned views of ``it`` with O_DIRECT on; what is left of
    them unwritten, and the first that is not aligned, for an ordinary write."""
    batch: list[memoryview] = []
    size = 0
    for v in it:
        mv = memoryview(v)
        if not _aligned(mv):
            return [*_direct(fd, batch, writeback), mv]
        batch.append(mv)
        size += mv.nbytes
        if size >= _DIRECT_BATCH_BYTES or len(batch) == _IOV_MAX:
            left = _direct(fd, batch, writeback)
            if left:
                return left
            batch, size = [], 0
    return _direct(fd, batch, writeback)


def _direct(fd: int, views: list[memoryview], writeback: Writeback | None,
            ) -> list[memoryview]:
    """Write ``views`` with O_DIRECT on; what is left unwritten where the filesystem
    refused (EINVAL: an alignment it wants larger), for an ordinary write."""
    i = 0
    while i < len(views):
        try:
            n = os.writev(fd, views[i:])
        except OSError as exc:
            if exc.errno not in _DIRECT_REFUSED:
                raise
            return views[i:]
        if writeback is not None:
            writeback.passed(n)
        # A short write (near ENOSPC) resumes where it stopped; where that is not on a
        # block boundary, the next direct write is refused (EINVAL) and the rest is
        # written the ordinary way.
        i = _past(views, i, n)
    return []


# Bytes per read-ahead request of a refill: the kernel reads at most about this much
# per POSIX_FADV_WILLNEED (its read-ahead window), so a whole file takes several.
_REFILL_BYTES = 8 * 1024 * 1024


def refill_in_background(fds: list[int]) -> None:
    """Have the kernel read files written past the page cache back into it, in a
    daemon thread that closes ``fds`` when done. The next incremental commit copies
    such a file's prefix: from page cache, not from the disk on its critical path.
    Only hints: where they are refused, or the process exits first, nothing is lost."""
    if not fds:
        return
    _REFILLING.update(fds)
    try:
        threading.Thread(target=_refill, args=(fds,), name="ckptwriter-refill",
                         daemon=True).start()
    except (RuntimeError, OSError):  # no thread to be had (a limit): no hint
        _close_refills(fds)


def _refill(fds: list[int]) -> None:
    for k, fd in enumerate(fds):
        try:
            size = os.fstat(fd).st_size
            for at in range(0, size, _REFILL_BYTES):
                os.posix_fadvise(fd, at, _REFILL_BYTES, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass
        finally:
            _close_refills(fds[k:k + 1])


# Descriptors a refill still holds: a fork of this process closes its copies (the
# thread that would have is not in it), so a long-lived worker never keeps a checkpoint
# that retention deletes on the disk.
_REFILLING: set[int] = set()


def _close_refills(fds: list[int]) -> None:
    for fd in fds:
        if fd in _REFILLING:
            _REFILLING.discard(fd)
            os.close(fd)


def _forget_refills_in_forked_child() -> None:
    _close_refills(list(_REFILLING))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_refills_in_forked_child)


def _writev_all(fd: int, views: list[memoryview]) -> None:
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        # Partial writes happen near ENOSPC and on signals: resume where it stopped.
        i = _past(views, i, n)


def _past(views: list[memoryview], i: int, n: int) -> int:
    """The index of the first view not wholly written once ``n`` more bytes from
    ``views[i]`` on are; a view written in part is cut to what is left of it."""
    while n:
        head = views[i]
        if n >= len(head):
            n -= len(head)
            i += 1
        else:
            views[i] = head[n:]
            n = 0
    return i


# copy_file_range is refused by some filesystems and sandboxes (FUSE, gVisor, seccomp,
# cross-device): fall back to an ordinary copy rather than failing every checkpoint.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM}
COPY_CHUNK = 4 * 1024 * 1024


def copy_prefix(src_fd: int, dst_fd: int, nbytes: int, shown: str,
                writeback: Writeback | None = None,
                stop: Callable[[], bool] | None = None) -> bool:
    """Copy the first ``nbytes`` of open file ``src_fd`` (named ``shown`` in errors) into
    ``dst_fd`` in the kernel (a reflink where the filesystem has one), a chunk at a time
    when ``writeback`` starts the pages' writeback as they are filled.

    ``stop`` is asked after each chunk (of at most :data:`_BATCH_BYTES` then); False:
    it said stop, and the copy is left unfinished."""
    step = nbytes if writeback is None else writeback.chunk
    if stop is not None:
        step = min(step, _BATCH_BYTES)
    copied = 0
    try:
        while copied < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, min(step, nbytes - copied), copied, copied)
            if n == 0:
                raise OSError(errno.EIO, f"{shown} is shorter than expected")
            copied += n
            if writeback is not None:
                writeback.wrote(n)
            if stop is not None and copied < nbytes and stop():
                return False
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _NO_KERNEL_COPY:
            raise
        while copied < nbytes:
            chunk = os.pread(src_fd, min(COPY_CHUNK, nbytes - copied), copied)
            if not chunk:
                raise OSError(errno.EIO, f"{shown} is shorter than expected") from None
            os.pwrite(dst_fd, chunk, copied)
            copied += len(chunk)
            if writeback is not None:
                writeback.wrote(len(chunk))
            if stop is not None and copied < nbytes and stop():
                return False
    os.lseek(dst_fd, nbytes, os.SEEK_SET)
    return True
