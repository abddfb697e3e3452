"""Reusing a file of a finalized local checkpoint: checked, then linked (or copied).

A reuse token names a file the writer created (its path, size, inode, mtime and ctime).
The file is opened below the checkpoints directory's descriptor, one component at a time,
never through a symlink, and used only if it is still that very file, unchanged. The
ctime is what tells an edit in place whose mtime was put back (``os.utime`` cannot set
ctime); the writer's own links and unlinks of a shared inode move it too, so they are
recorded (:class:`OwnChanges`) and a token whose ctime they explain is still good. A
whole-file reuse hard-links it into the pending checkpoint (``linkat`` through the
directory descriptors) and checks that the new name is the inode just verified; where
the filesystem refuses the link (``EXDEV``, ``EPERM``, ``EMLINK``...) the caller copies
the bytes instead. A file in a checkpoint is never written in place, so one inode can
safely stand in several checkpoints; deleting one of them unlinks a name only. (Only
once a deleted checkpoint's memory file has no name left in any checkpoint, and no one
has it open, may it be overwritten as the next copy's spare: storage/local_prepare.py.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading

from .base import ReuseToken
from .dirfd import identity, open_below, open_dir

__all__ = ["OwnChanges", "link_checked", "open_checked", "token_ident", "unlink_recorded"]

# What linkat answers where a hard link cannot be made here: copy instead.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP,
                      errno.ENOTSUP, errno.EACCES, errno.ENOSYS, errno.EINVAL})


# Recorded ctime moves kept per inode. A token is issued at one commit and checked at the
# next, so the chain it needs is the few moves in between (a link, retention's unlinks);
# older moves of the same inode are never needed again.
_MAX_CHANGES = 16


class OwnChanges:
    """The ctime moves of files the writer itself linked or unlinked (one storage).

    Per inode, ctime before -> ctime after: a token issued before such a move is still
    the writer's file if a chain of its own moves leads to the ctime seen now; anyone
    else's change (an edit, a chmod, a utime) breaks the chain. Only inodes still on
    disk with several names are kept (the last unlink forgets one), each with its last
    few moves: the record stays as small as the shared files of the kept checkpoints,
    however long the run, and a move a live token needs is never dropped.
    """

    def __init__(self) -> None:
        self._moves: dict[int, dict[int, int]] = {}
        # Held across a link or unlink and its record, and across a check: a removal
        # in the background (storage/local_background.py) never shows a check a ctime
        # its record does not explain yet.
        self.lock = threading.RLock()

    def record(self, ino: int, before: int, after: int) -> None:
        if before == after:
            return
        moves = self._moves.setdefault(ino, {})
        moves[before] = after
        while len(moves) > _MAX_CHANGES:
            del moves[next(iter(moves))]  # the oldest (dicts keep insertion order)

    def forget(self, ino: int) -> None:
        """The inode's last name is gone: no token can name it any more."""
        self._moves.pop(ino, None)

    def explains(self, ino: int, was: int, now: int) -> bool:
        moves = self._moves.get(ino, {})
        for _ in range(_MAX_CHANGES + 1):
            if was == now:
                return True
            nxt = moves.get(was)
            if nxt is None:
                return False
            was = nxt
        return False

    def __len__(self) -> int:
        return sum(len(m) for m in self._moves.values())


def token_ident(st: os.stat_result) -> tuple[int, int, int]:
    """What a reuse token records of a file: inode, mtime, ctime."""
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def open_checked(dir_fd: int, rel: str, token: ReuseToken,
                 own: OwnChanges | None = None) -> int | None:
    """``rel`` below ``dir_fd`` opened read-only, if it is still the file of ``token``."""
    try:
        fd = open_below(dir_fd, rel, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with own.lock if own is not None else contextlib.nullcontext():
        st = os.fstat(fd)
        # A file replaced or edited in place since (same size, other bytes) must not be
        # reused with the checksum carried for the old bytes: the size, inode and mtime
        # must match, and the ctime too, but for the writer's own links and unlinks.
        ok = stat.S_ISREG(st.st_mode) and len(token.ident) == 3 and \
            (st.st_size, st.st_ino, st.st_mtime_ns) == (token.nbytes, *token.ident[:2])
        if ok:
            was = int(token.ident[2])
            ok = was == st.st_ctime_ns or (
                own is not None and own.explains(st.st_ino, was, st.st_ctime_ns))
    if not ok:
        os.close(fd)
        return None
    return fd


def unlink_recorded(dir_fd: int, name: str, st: os.stat_result,
                    own: OwnChanges | None) -> None:
    """Unlink ``name`` of ``dir_fd`` (a file ``st`` describes); when it is a shared inode
    (more links), the ctime move this causes is recorded in ``own``."""
    if own is None or not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
        os.unlink(name, dir_fd=dir_fd)
        if own is not None and stat.S_ISREG(st.st_mode):
            own.forget(st.st_ino)
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        os.unlink(name, dir_fd=dir_fd)
        return
    try:
        with own.lock:
            before = os.fstat(fd)
            os.unlink(name, dir_fd=dir_fd)
            if before.st_ino == st.st_ino:
                own.record(before.st_ino, before.st_ctime_ns, os.fstat(fd).st_ctime_ns)
    finally:
        os.close(fd)


def link_checked(dir_fd: int, rel: str, src_fd: int, dst_dir_fd: int, name: str,
                 own: OwnChanges | None = None) -> bool:
    """Hard-link ``rel`` (below ``dir_fd``, open and checked as ``src_fd``) as ``name`` of
    ``dst_dir_fd``; False (nothing left behind) where a link cannot be made or the name
    turned out to be another file than ``src_fd`` (swapped meanwhile).

    Raises:
        OSError: the link failed for another reason (ENOSPC, EIO...).
    """
    with own.lock if own is not None else contextlib.nullcontext():
        return _link_checked(dir_fd, rel, src_fd, dst_dir_fd, name, own)


def _link_checked(dir_fd: int, rel: str, src_fd: int, dst_dir_fd: int, name: str,
                  own: OwnChanges | None) -> bool:
    *dirs, last = rel.split("/")
    parent = dir_fd
    try:
        for part in dirs:
            nxt = open_dir(part, parent)
            if parent != dir_fd:
                os.close(parent)
            parent = nxt
        before = os.fstat(src_fd).st_ctime_ns
        try:
            os.link(last, name, src_dir_fd=parent, dst_dir_fd=dst_dir_fd,
                    follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _NO_LINK:
                return False
            raise
    finally:
        if parent != dir_fd:
            os.close(parent)
    st = os.stat(name, dir_fd=dst_dir_fd, follow_symlinks=False)
    src = os.fstat(src_fd)
    if not stat.S_ISREG(st.st_mode) or identity(st) != identity(src):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dst_dir_fd)
        return False
    if own is not None:
        own.record(src.st_ino, before, src.st_ctime_ns)
    return True
