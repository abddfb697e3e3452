"""What a crashed local writer leaves behind, cleaned when the next one opens.

``.tmp-*`` (a commit that never finished), ``.trash-*`` (a deletion, maybe half done)
and ``.replaced-*`` (an old copy set aside by a re-commit where the filesystem cannot
swap two directories). Only a ``.replaced-*`` that is a real directory holding a whole
checkpoint, whose name is free, comes back; everything else is removed.

A leftover that is a symlink (to another checkpoint, anywhere) is unlinked: never
opened, hashed, followed or renamed into ``ep_*``, and removed without a warning (it is
no checkpoint of this directory). A hard link inside a leftover is only unlinked: the
file it shares is never opened for writing.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

from .. import layout
from .dirfd import identity, open_dir, remove_entry, rename_noreplace

__all__ = ["clean_leftovers"]


def clean_leftovers(dir_fd: int, root: Path, is_whole: Callable[[str], bool]) -> None:
    """Restore or remove every leftover entry of the open checkpoints directory.

    Args:
        dir_fd: the checkpoints directory, open and locked.
        root: its path, for ``is_whole`` where /proc is not there to reach a descriptor.
        is_whole: tells whether a store path holds a complete, intact checkpoint.

    Raises:
        OSError: a leftover cannot be read, renamed or removed.
    """
    for entry in sorted(os.listdir(dir_fd)):
        if layout.is_leftover(entry) and not _restore(dir_fd, root, entry, is_whole):
            remove_entry(dir_fd, entry)


def _restore(dir_fd: int, root: Path, entry: str, is_whole: Callable[[str], bool]) -> bool:
    """Put back a whole checkpoint a crash left in ``.replaced-*``; False: remove it."""
    if not entry.startswith(layout.REPLACED_PREFIX):
        return False  # .trash-* holds what retention deletes, which stays deleted
    name = entry[len(layout.REPLACED_PREFIX) :].rpartition("-")[0]
    if layout.parse_checkpoint_name(name) is None or _exists(dir_fd, name):
        return False
    try:
        efd = open_dir(entry, dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return False  # a symlink or a file: unlinked, never followed
        raise
    try:
        checked = identity(os.fstat(efd))
        # Only a whole checkpoint comes back: a trash dir whose rmtree was killed
        # half-way still has runtime.json but not all its files (found by the torture).
        # Checked through the descriptor: swapping the entry for a link meanwhile
        # cannot make the check read anything else.
        if not is_whole(_through(efd, root / entry)) or _episode(efd) != \
                layout.parse_checkpoint_name(name):
            # Checked through /proc/self/fd, the directory's name is "."; its episode
            # must still be the one the name it would come back as says.
            return False
    finally:
        os.close(efd)
    rename_noreplace(dir_fd, entry, name)
    if identity(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)) != checked:
        # Swapped between the check and the rename: not what was checked, so it goes.
        trash = layout.trash_name(name)
        os.rename(name, trash, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        remove_entry(dir_fd, trash)
    return True


def _episode(efd: int) -> int | None:
    """The episode the runtime.json inside directory ``efd`` records (None: unreadable)."""
    try:
        fd = os.open(layout.RUNTIME_JSON, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=efd)
        try:
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        value = json.loads(data).get("episode_index")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _through(fd: int, fallback: Path) -> str:
    """A path that reaches exactly the open directory ``fd`` (Linux /proc), else ``fallback``."""
    via = f"/proc/self/fd/{fd}/."
    return via if os.path.isdir(via) else str(fallback)
