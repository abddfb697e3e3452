"""File operations relative to an open directory that never follow a symlink.

The local backend opens its checkpoints directory once and reaches everything in it
through that descriptor (``*at`` calls): a path component retargeted or swapped for a
symlink after open can neither send a write elsewhere nor make a removal cross into
another tree. What is opened below it is opened one component at a time, ``O_NOFOLLOW``.

``renameat2(RENAME_EXCHANGE)`` swaps two names in one step (Linux >= 3.15, ext4, xfs,
btrfs, tmpfs, ...); :func:`exchange` raises ``OSError(EINVAL | ENOSYS)`` where the
kernel, the filesystem (NFS, some FUSE) or the platform has no such call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import sys
from collections.abc import Callable

from .posix_io import libc_function

__all__ = [
    "DIR_FLAGS",
    "exchange",
    "identity",
    "open_below",
    "open_dir",
    "remove_entry",
    "rename_noreplace",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# renameat2's number where libc predates its wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357,
                  "s390x": 347}

_Renameat2 = Callable[[int, bytes, int, bytes, int], int]


def _load_renameat2() -> _Renameat2 | None:
    if not sys.platform.startswith("linux"):
        return None
    fn: _Renameat2 | None = libc_function(
        "renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                      ctypes.c_uint])
    if fn is not None:
        return fn
    nr = _SYS_RENAMEAT2.get(platform.machine())
    if nr is None:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall  # variadic: no argtypes
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long

    def via_syscall(a: int, src: bytes, b: int, dst: bytes, flags: int) -> int:
        return int(syscall(ctypes.c_long(nr), ctypes.c_int(a), ctypes.c_char_p(src),
                           ctypes.c_int(b), ctypes.c_char_p(dst), ctypes.c_uint(flags)))

    return via_syscall


_renameat2 = _load_renameat2()


def _rename2(dir_fd: int, src: str, dst: str, flags: int) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this platform")
    if _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


def exchange(dir_fd: int, a: str, b: str) -> None:
    """Swap entries ``a`` and ``b`` of ``dir_fd`` atomically (both must exist).

    Raises:
        OSError: ``EINVAL``/``ENOSYS``/``EOPNOTSUPP`` where the swap is not supported.
    """
    _rename2(dir_fd, a, b, _RENAME_EXCHANGE)


def rename_noreplace(dir_fd: int, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` in ``dir_fd``, failing (``EEXIST``) if ``dst`` exists.

    A plain rename of a directory replaces an empty directory at ``dst``; where
    ``RENAME_NOREPLACE`` is not supported, ``dst`` is checked first (the caller holds
    the directory's lock, so only a hostile process could race the check).
    """
    try:
        _rename2(dir_fd, src, dst, _RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    try:
        os.stat(dst, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


def identity(st: os.stat_result) -> tuple[int, int]:
    """What tells one filesystem object from another."""
    return st.st_dev, st.st_ino


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory (not through a final symlink) as a descriptor for ``*at`` calls."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_below(dir_fd: int, rel: str, flags: int) -> int:
    """Open ``rel`` (``a/b/c``) below ``dir_fd``, no component reached through a symlink."""
    *dirs, last = rel.split("/")
    fd = dir_fd
    try:
        for part in dirs:
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, "not a plain name", rel)
            nxt = open_dir(part, fd)
            if fd != dir_fd:
                os.close(fd)
            fd = nxt
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


Unlink = Callable[[int, str, os.stat_result], None]


def _unlink(dir_fd: int, name: str, st: os.stat_result) -> None:
    os.unlink(name, dir_fd=dir_fd)


def remove_entry(dir_fd: int, name: str, unlink: Unlink = _unlink) -> None:
    """Remove ``name`` of ``dir_fd`` and everything below it; a missing name is no error.

    ``unlink(dir_fd, name, stat)`` removes each non-directory (the local backend's records
    the ctime moves of the shared files it unlinks).

    A symlink (anywhere in the tree) is unlinked, never followed; a hard link is only
    unlinked, so the file it shares is never written. A directory is entered through a
    descriptor that is checked to be the very directory listed, and never when it is
    on another filesystem (a mount planted inside): the removal stays in this tree.

    Raises:
        OSError: an entry cannot be removed (the rest is left for the next start).
    """
    try:
        top = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        unlink(dir_fd, name, top)
        return
    dev = os.fstat(dir_fd).st_dev
    # Iterative, one open descriptor per level: a hostile, deeply nested tree cannot
    # exhaust the Python stack.
    stack: list[tuple[int, str, int]] = [(dir_fd, name, _enter(dir_fd, name, top, dev))]
    try:
        while stack:
            parent, dname, fd = stack[-1]
            child = _next_child(fd, unlink)
            if child is not None:
                cname, st = child
                stack.append((fd, cname, _enter(fd, cname, st, dev)))
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(dname, dir_fd=parent)
    finally:
        for _, _, fd in stack:
            os.close(fd)


def _enter(parent: int, name: str, st: os.stat_result, dev: int) -> int:
    if st.st_dev != dev:
        raise OSError(errno.EXDEV, "is on another filesystem; not removed", name)
    fd = open_dir(name, parent)
    if identity(os.fstat(fd)) != identity(st):
        os.close(fd)
        raise OSError(errno.EAGAIN, "changed while it was being removed", name)
    return fd


def _next_child(fd: int, unlink: Unlink) -> tuple[str, os.stat_result] | None:
    """Unlink every non-directory of ``fd``; the first subdirectory left, if any."""
    with os.scandir(fd) as it:
        for entry in it:
            st = os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return entry.name, st
            unlink(fd, entry.name, st)
    return None
