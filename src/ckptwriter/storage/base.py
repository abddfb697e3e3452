"""The primitives every storage backend provides; everything above them is written once.

A backend owns atomicity and durability only, in the spirit of Orbax's ``TemporaryPath``
and fsspec's transactions:

- :class:`ReadStore`: read primitives over one filesystem or bucket (stat, list, read,
  read a link). The one reader (``reader.py``) resolves, verifies and loads over them.
- :class:`Backend`: one checkpoints directory a writer owns: lock it, clean what a
  crashed writer left, :meth:`~Backend.begin` a :class:`PendingCheckpoint` to write
  files into and then finalize (rename locally, commit marker remotely) or discard,
  replace the ``latest`` and ``best`` pointers, delete a checkpoint.

The commit pipeline (``commit.py``) decides file order, checksums and what is reused;
a backend never builds a manifest. Store paths are ``/``-separated strings: absolute
paths on a local filesystem, ``bucket/key`` on object storage.

Every method is synchronous and blocking: the pipeline runs them in one worker thread
(or the writer process), one checkpoint at a time.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "Backend",
    "DirReader",
    "FileSpec",
    "FileTooLargeError",
    "PendingCheckpoint",
    "ReadStore",
    "ReuseToken",
    "StoreEntry",
]

EntryKind = Literal["file", "dir", "link", "other"]


class FileTooLargeError(OSError):
    """A file is larger than a read allowed: nothing (or only ``limit`` bytes) was read.

    ``size`` is its size when the store knows it (``None``: larger than ``limit``).
    """

    def __init__(self, path: str, size: int | None, limit: int) -> None:
        found = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(errno.EFBIG, f"{found}, more than the {limit} expected", path)
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """What :meth:`ReadStore.stat` knows of one path, without following a final symlink."""

    kind: EntryKind
    size: int = 0


@dataclass(frozen=True, slots=True)
class ReuseToken:
    """An opaque handle on a file a finalized checkpoint holds, for the next one to reuse.

    Only the backend that issued it interprets ``ident`` (inode, mtime, ctime locally; an
    ETag on object storage); the pipeline keeps it beside the checksum state it carries.
    """

    path: str
    nbytes: int
    ident: tuple[str | int, ...] = ()


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file of a pending checkpoint.

    Its bytes are ``reuse``'s first ``reuse.nbytes`` bytes (copied by the backend: a
    kernel-side copy or reflink locally, a server-side copy remotely) followed by ``data``.
    With ``reuse`` and no ``data`` the file is the reused one whole: no byte is written
    (a hard link locally, identity-checked, a copy where links fail; a server-side copy
    of the object remotely).
    """

    name: str
    data: Sequence[memoryview | bytes]
    reuse: ReuseToken | None = None

    @property
    def nbytes(self) -> int:
        """The file's final size."""
        # Of bytes still arriving (the writer process's hand-over), the size is known
        # before they are: iterating them would wait for the last one.
        size = getattr(self.data, "nbytes", None)
        if not isinstance(size, int):
            size = sum(len(d) for d in self.data)
        return (self.reuse.nbytes if self.reuse else 0) + size


class PendingCheckpoint(Protocol):
    """A checkpoint being written: invisible to readers until :meth:`finalize`."""

    name: str
    # What copying ahead the memory prefix this checkpoint extended took (0: none).
    prepared_seconds: float

    def write(self, files: Sequence[FileSpec]) -> dict[str, ReuseToken]:
        """Write files, durable by the time :meth:`finalize` makes the checkpoint appear;
        a token per file for the next commit.

        Raises:
            StorageError: the store failed (the message says what to do).
        """
        ...

    def finalize(self, marker: bytes, *, latest: bytes | None = None) -> str:
        """Write ``runtime.json`` (the marker) last and make the checkpoint appear at once.

        ``latest`` is the ``latest.json`` the pointer move that follows will write: a
        backend may make it durable with the checkpoint's files, off the move's path.

        Returns:
            the checkpoint's location as shown to users (a path or a URL).
        """
        ...

    def discard(self) -> None:
        """Remove whatever was written; never raises (a next writer cleans up)."""
        ...


class DirReader(Protocol):
    """One directory opened once: its files are read from that very directory, even if
    its path is renamed or swapped for a symlink meanwhile (locally a descriptor)."""

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        """The bytes of regular file ``name`` in it (as :meth:`ReadStore.read`)."""
        ...

    def stat(self, name: str) -> StoreEntry | None:
        """What ``name`` is in it (as :meth:`ReadStore.stat`)."""
        ...

    def moved(self) -> bool:
        """True if its path no longer leads to it (a re-commit swapped another copy in)."""
        ...


class ReadStore(Protocol):
    """Read primitives over one filesystem or bucket."""

    # True where a checkpoint exists only once its runtime.json marker does (object
    # storage: no rename); a local directory without one is listed as incomplete.
    marker_commits: bool

    def check_root(self, path: str) -> None:
        """Fail early, with a StorageError-worthy exception, when ``path`` is unreachable
        (a missing bucket, bad credentials); a no-op where there is nothing to check."""
        ...

    def url(self, path: str) -> str:
        """``path`` as a user would write it (a plain path, or ``s3://bucket/key``)."""
        ...

    def as_path(self, path: str) -> Path:
        """``path`` as the :class:`~pathlib.Path` the public API returns."""
        ...

    def join(self, base: str, *names: str) -> str:
        """A child path."""
        ...

    def parent(self, path: str) -> str:
        """The containing directory or prefix."""
        ...

    def stat(self, path: str) -> StoreEntry | None:
        """What is at ``path`` (``None``: nothing); a symlink is reported, not followed."""
        ...

    def listdir(self, path: str) -> list[str] | None:
        """Names directly under ``path`` (``None``: not a directory or prefix)."""
        ...

    def read(self, path: str, *, limit: int | None = None) -> bytes:
        """The bytes of a regular file, never reached through a final symlink.

        ``limit``: the most bytes the caller accepts (a manifest's size, a document's
        cap); a larger file is refused before it is read whole.

        Raises:
            FileNotFoundError: nothing there.
            IsADirectoryError: a symlink (``errno.ELOOP``), directory or other non-regular
                file.
            FileTooLargeError: more than ``limit`` bytes.
            OSError: it cannot be read.
        """
        ...

    def open_dir(self, path: str) -> AbstractContextManager[DirReader]:
        """Directory ``path``, opened once to read its files (a checkpoint).

        The directory that holds it is the caller's (reached as its path says); ``path``
        itself is never reached through a symlink, nor is anything read in it.

        Raises:
            FileNotFoundError: nothing there.
            NotADirectoryError: not a directory (``errno.ELOOP``: a symlink).
            OSError: it cannot be opened.
        """
        ...

    def readlink(self, path: str) -> str | None:
        """A symlink's target (``None``: not a symlink, or the store has none)."""
        ...

    def sizes(self, path: str) -> dict[str, int]:
        """Every regular file below ``path`` (relative name -> size), in one listing."""
        ...

    def error(self, exc: BaseException, action: str, path: str) -> Exception:
        """A store failure as the :class:`~ckptwriter.StorageError` a user can act on."""
        ...


class Backend(Protocol):
    """One checkpoints directory (or prefix) that a writer owns."""

    @property
    def location(self) -> str:
        """The directory or URL, as shown to users."""
        ...

    @property
    def store(self) -> ReadStore:
        """The read primitives of the filesystem or bucket it lives in."""
        ...

    @property
    def root(self) -> str:
        """Its store path."""
        ...

    def open(self, is_whole: Callable[[str], bool]) -> None:
        """Create the directory, take the writer lock, clean leftovers of a crash.

        Args:
            is_whole: tells whether a checkpoint directory (store path) a crash left
                aside is complete and may be put back; the reader decides, not the backend.

        Raises:
            DirectoryLockedError: another writer owns it.
            StorageError: it cannot be created or read.
        """
        ...

    def close(self) -> None:
        """Release the writer lock."""
        ...

    def begin(self, name: str) -> PendingCheckpoint:
        """Start checkpoint ``name`` (``ep_000100``)."""
        ...

    def can_reuse(self, token: ReuseToken, *, whole: bool = False) -> bool:
        """True if ``token``'s file still holds exactly the bytes it was issued for, and
        this backend can reuse it: as a prefix to append to, or (``whole``) whole."""
        ...

    @property
    def prepares(self) -> bool:
        """Whether :meth:`prepare_prefix` can help: False on object storage, and on a
        filesystem that clones (the commit's own copy costs nothing there)."""
        ...

    def prepare_prefix(self, token: ReuseToken, stop: Callable[[], bool]) -> float | None:
        """Copy ``token``'s file ahead for the next commit to extend (then the seconds it
        took); None: not done (nothing to gain here, refused, failed or ``stop``ped).

        Only ever an optimization: never raises, and a commit that extends another file
        (or none) than the one prepared copies as it would have."""
        ...

    def replace_pointer(self, name: str, pointer_json: bytes, *, pointer: str = "latest") -> None:
        """Point ``pointer`` (``latest`` or ``best``) at finalized checkpoint ``name``.

        Atomically: a reader (and a crash) sees the old target or the new one. Locally the
        symlink moves first, then ``<pointer>.json``; on object storage only the JSON.
        """
        ...

    def remove_pointer(self, pointer: str) -> None:
        """Remove ``pointer`` and ``<pointer>.json`` (``best`` once nothing has a score).

        Each step leaves either nothing or a name of a checkpoint that is still whole.
        """
        ...

    def delete(self, name: str) -> None:
        """Remove a checkpoint so that it disappears for readers in one step (the rest
        of its removal may go on in the background: :meth:`settle`)."""
        ...

    def settle(self, *, wait: bool) -> tuple[bool, list[str]]:
        """Whether deletions in the background may have freed space since the last call
        (one finished since, or one still under way: then, with ``wait``, waited for),
        and why those that failed since the last call failed."""
        ...

    def _step(self, name: str) -> None:
        """Called right after each protocol step; a no-op outside fault-injection tests."""
        ...

