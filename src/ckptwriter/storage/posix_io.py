"""Low-level POSIX file operations the local backend and the writer process share."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import StorageError

__all__ = ["COPY_CHUNK", "copy_prefix", "os_error", "write_all"]

# Linux caps one writev at IOV_MAX (1024) buffers.
_IOV_MAX = 1024
# Bytes per writev: few calls, yet a stream still arriving is written a slice at a time.
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


def write_all(fd: int, views: Iterable[memoryview | bytes], *, writeback: bool = False) -> None:
    """Write every byte of ``views`` to a blocking fd, resuming after partial writes.

    ``views`` is read as it is written, a few MiB per call: bytes still arriving (the
    writer process's hand-over) are written as they come, not after the last. With
    ``writeback`` (an fsync follows), each batch is sent to the disk as soon as it is
    written, so that the fsync finds little left to do.
    """
    start = _start_writeback if writeback else None
    offset = os.lseek(fd, 0, os.SEEK_CUR) if start is not None else 0
    batch: list[memoryview] = []
    size = 0
    for v in views:
        if len(v):
            batch.append(memoryview(v))
            size += len(v)
        if size >= _BATCH_BYTES or len(batch) == _IOV_MAX:
            _writev_all(fd, batch)
            if start is not None:
                start(fd, offset, size)
                offset += size
            batch, size = [], 0
    _writev_all(fd, batch)


def _writev_all(fd: int, views: list[memoryview]) -> None:
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:])
        # Partial writes happen near ENOSPC and on signals: resume where it stopped.
        while n:
            head = views[i]
            if n >= len(head):
                n -= len(head)
                i += 1
            else:
                views[i] = head[n:]
                n = 0


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        # Only a head start: its errors (a filesystem without it) are the fsync's to report.
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)

    return start


# sync_file_range(SYNC_FILE_RANGE_WRITE): start writing the range back, do not wait.
# Without it the whole file waits in the page cache for the fsync, which then writes it
# all while nothing else happens; started per batch, the disk works while we copy.
_SYNC_FILE_RANGE_WRITE = 2
_start_writeback = _load_sync_file_range()


# copy_file_range is refused by some filesystems and sandboxes (FUSE, gVisor, seccomp,
# cross-device): fall back to an ordinary copy rather than failing every checkpoint.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EPERM}
COPY_CHUNK = 4 * 1024 * 1024


def copy_prefix(src_fd: int, dst_fd: int, nbytes: int, shown: str) -> None:
    """Copy the first ``nbytes`` of open file ``src_fd`` (named ``shown`` in errors) into
    ``dst_fd`` in the kernel (a reflink where the filesystem has one)."""
    copied = 0
    try:
        while copied < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - copied, copied, copied)
            if n == 0:
                raise OSError(errno.EIO, f"{shown} is shorter than expected")
            copied += n
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _NO_KERNEL_COPY:
            raise
        while copied < nbytes:
            chunk = os.pread(src_fd, min(COPY_CHUNK, nbytes - copied), copied)
            if not chunk:
                raise OSError(errno.EIO, f"{shown} is shorter than expected") from None
            os.pwrite(dst_fd, chunk, copied)
            copied += len(chunk)
    os.lseek(dst_fd, nbytes, os.SEEK_SET)
