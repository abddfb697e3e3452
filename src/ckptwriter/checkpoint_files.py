"""Reading one checkpoint's files: from the directory opened once, each bounded by size.

A checkpoint is opened once (:meth:`~ckptwriter.storage.base.ReadStore.open_dir`; locally
a descriptor, ``O_NOFOLLOW``) and ``runtime.json`` and every file it lists are read from
that very directory, so an ``ep_*`` swapped for a symlink after a reader checked it never
leads the read into another tree. No file is read past the size the manifest records
(``runtime.json`` itself past :data:`~ckptwriter.manifest.MAX_DOCUMENT_BYTES`): a planted
sparse file of terabytes is refused from its size, never read whole.

Part of the full check of :mod:`ckptwriter.integrity`.
"""

from __future__ import annotations

import concurrent.futures
import errno
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from . import layout
from .discovery import name_of
from .errors import CheckpointCorruptError, CheckpointError, UnsafePathError
from .manifest import MAX_DOCUMENT_BYTES, FileDigest
from .storage.base import DirReader, FileTooLargeError, ReadStore

__all__ = [
    "Gone",
    "current_marker",
    "file_error",
    "marker_commits",
    "opened",
    "opened_with_marker",
    "read_files",
    "read_marker",
    "size_problem",
]

# Files of one checkpoint read at once: a checkpoint has a few (memory, agent.json,
# runtime extras), so this is rarely the limit.
_READ_THREADS = 8
# Errors that make one file unusable (not the store): reported as that file's problem.
_FILE_ERRNOS = frozenset({
    errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM, errno.EIO,
})
_NOT_COMMITTED = "No committed checkpoint (runtime.json) under this prefix."
# Opens of one checkpoint whose runtime.json vanished because a re-commit swapped a new
# copy in meanwhile (each one follows a commit): the reader's own bound on being lapped.
_REOPENS = 100


class Gone(Exception):
    """No checkpoint at a path (nothing there, or on object storage no commit marker)."""

    def __init__(self, hint: str = "") -> None:
        super().__init__(hint)
        self.hint = hint


def marker_commits(store: ReadStore) -> bool:
    # Object stores have no rename: a checkpoint appears when runtime.json is written, so
    # a prefix without it is a commit in progress or a dead writer's, not a damaged one.
    return store.marker_commits


# -- one checkpoint: each file read once, checked on the bytes read -------------------


def file_error(store: ReadStore, path: str, shown: str, name: str, exc: OSError) -> Exception:
    """The error a failed read of one file of a checkpoint means (the store's own if none)."""
    if isinstance(exc, FileNotFoundError):
        return CheckpointCorruptError(shown, name, "missing")
    if isinstance(exc, FileTooLargeError):
        found = "" if exc.size is None else f"{exc.size} bytes, "
        return CheckpointCorruptError(shown, name, f"too large ({found}more than the "
                                      f"{exc.limit} bytes such a document may have)")
    if isinstance(exc, IsADirectoryError):
        # The store says ELOOP for a symlink it refused to follow: never stat'ed by path
        # (the path may lead elsewhere by now).
        if exc.errno == errno.ELOOP:
            return UnsafePathError(shown, name, "is a symlink; refusing to follow it")
        return CheckpointCorruptError(shown, name, "is not a regular file")
    if exc.errno in _FILE_ERRNOS:
        return CheckpointCorruptError(shown, name, f"unreadable ({exc.strerror})")
    return exc


def _read_file(
    store: ReadStore, d: DirReader, ckpt: str, name: str, digest: FileDigest, shown: str
) -> bytes:
    try:
        # At most the recorded size (+1 to see more): a file larger than runtime.json
        # says is refused before it is read (a planted sparse file of terabytes).
        return d.read(name, limit=digest.bytes)
    except FileTooLargeError as exc:
        size = exc.size if exc.size is not None else digest.bytes + 1
        raise CheckpointCorruptError(shown, name, size_problem(size, digest)) from None
    except OSError as exc:
        raise file_error(store, store.join(ckpt, name), shown, name, exc) from None


def read_files(
    store: ReadStore, d: DirReader, ckpt: str, files: dict[str, FileDigest], shown: str
) -> list[tuple[str, bytes]]:
    """Every file of a checkpoint, read at once; the first failure (in ``files`` order) raised.

    A live writer's retention may retire the checkpoint while it is read: the window a
    reader must win is the time to fetch all of its files, so they are fetched together
    (on object storage one round trip instead of one per file; on disk a file once
    opened is read whole even if it is deleted meanwhile).
    """
    def one(name: str) -> bytes | Exception:
        try:
            return _read_file(store, d, ckpt, name, files[name], shown)
        except (CheckpointError, OSError) as exc:
            return exc

    names = list(files)
    if len(names) <= 1:
        got = [one(n) for n in names]
    else:
        with concurrent.futures.ThreadPoolExecutor(
            min(len(names), _READ_THREADS), "ckptwriter-read"
        ) as pool:
            got = list(pool.map(one, names))
    out: list[tuple[str, bytes]] = []
    for name, data in zip(names, got, strict=True):
        if isinstance(data, Exception):
            raise data
        out.append((name, data))
    return out


def read_marker(store: ReadStore, d: DirReader, ckpt: str, shown: str) -> bytes:
    try:
        return d.read(layout.RUNTIME_JSON, limit=MAX_DOCUMENT_BYTES)
    except OSError as exc:
        entry = store.stat(ckpt)
        if entry is None or entry.kind != "dir":
            raise Gone() from None
        if isinstance(exc, FileNotFoundError) and marker_commits(store):
            raise Gone(_NOT_COMMITTED) from None
        path = store.join(ckpt, layout.RUNTIME_JSON)
        raise file_error(store, path, shown, layout.RUNTIME_JSON, exc) from None


@contextmanager
def opened(store: ReadStore, ckpt: str) -> Iterator[DirReader]:
    """Checkpoint ``ckpt`` opened once: every file is read from that very directory.

    Raises:
        Gone: nothing there (or not a directory).
        UnsafePathError: it is a symlink (a checkpoint is a real directory of its
            checkpoints directory; one swapped in after a check is never followed).
    """
    with ExitStack() as stack:
        try:
            d = stack.enter_context(store.open_dir(ckpt))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(store.url(store.parent(ckpt)), name_of(ckpt),
                                      "is a symlink; refusing to follow it") from None
            entry = store.stat(ckpt)
            if entry is None or entry.kind != "dir":
                raise Gone() from None  # also a name too long to exist (ENAMETOOLONG)
            path = store.join(ckpt, layout.RUNTIME_JSON)
            raise file_error(store, path, store.url(ckpt), layout.RUNTIME_JSON, exc) from None
        yield d


@contextmanager
def opened_with_marker(
    store: ReadStore, ckpt: str, shown: str, marker: bytes | None
) -> Iterator[tuple[DirReader, bytes]]:
    """Checkpoint ``ckpt`` opened, with its runtime.json (``marker`` if already read).

    A re-commit swaps the whole directory in one step: when runtime.json is gone from
    the copy opened because another copy took its name, the new copy is opened.

    Raises:
        Gone, CheckpointCorruptError: as :func:`opened` and :func:`read_marker`.
    """
    for attempt in range(_REOPENS):
        with opened(store, ckpt) as d:
            if marker is None:
                try:
                    got = read_marker(store, d, ckpt, shown)
                except CheckpointCorruptError:
                    if attempt + 1 < _REOPENS and d.moved():
                        continue
                    raise
            else:
                got = marker
            yield d, got
            return


def current_marker(store: ReadStore, ckpt: str) -> bytes | None:
    """The runtime.json bytes of checkpoint ``ckpt`` now (None: none can be read), read
    the way a full check reads them (never through a symlink)."""
    try:
        with opened(store, ckpt) as d:
            return d.read(layout.RUNTIME_JSON, limit=MAX_DOCUMENT_BYTES)
    except (OSError, Gone, CheckpointError):
        return None


def size_problem(size: int, digest: FileDigest) -> str:
    what = "truncated?" if size < digest.bytes else "appended to?"
    return f"size {size} bytes, expected {digest.bytes} ({what})"
