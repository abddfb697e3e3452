"""The few object-store operations checkpoints need, over any fsspec filesystem.

fsspec and s3fs are untyped: every ``Any`` stays in this module, behind
:class:`ObjectStore` (any fsspec filesystem) and :class:`S3ObjectStore` (s3fs, which adds
conditional writes, concurrent multipart uploads and a server-side copy of a byte range).

Error handling:
    Every method lets the filesystem's ``OSError`` (or botocore error) through;
    :func:`store_error` turns one into a :class:`StorageError` that says what to do.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import posixpath
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import StorageError
from .base import FileTooLargeError, StoreEntry

__all__ = ["CopySource", "ObjectStore", "PutItem", "slices", "store_error"]

# Requests in flight at once for one checkpoint (parts and small objects together).
UPLOAD_CONCURRENCY = 8
_READ_CHUNK = 4 * 2**20
# Stores without conditional writes get check-then-write under this lock: atomic for
# writers in this process (all that memory:// has), best effort across machines.
_CREATE_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class _Prefix:
    """A prefix read as a directory (:class:`~ckptwriter.storage.base.DirReader`)."""

    store: ObjectStore
    path: str

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        return self.store.read(self.store.join(self.path, name), limit=limit)

    def stat(self, name: str) -> StoreEntry | None:
        return self.store.stat(self.store.join(self.path, name))

    def moved(self) -> bool:
        return False  # a prefix is not a thing that can be swapped


@dataclass(frozen=True, slots=True)
class CopySource:
    """Reuse the first ``nbytes`` of an existing object server-side (S3 UploadPartCopy)."""

    path: str
    nbytes: int
    etag: str


@dataclass(frozen=True, slots=True)
class PutItem:
    """One object to upload: its bytes as a list of buffers, maybe after a copied prefix."""

    path: str
    parts: Sequence[memoryview | bytes]
    copy_from: CopySource | None = None
    # Only if no object is there (If-None-Match: *) where the store can condition writes.
    exclusive: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes uploaded from this process (the copied prefix is not counted)."""
        # Parts still arriving, or read from the training process, know their size
        # without being read.
        size = getattr(self.parts, "nbytes", None)
        return size if isinstance(size, int) else sum(len(p) for p in self.parts)


class PutConflict(FileExistsError):
    """Exclusive uploads found objects already there; every other upload completed.

    Attributes:
        paths: the objects that were there (nothing of this batch was written to them).
        tags: path -> tag of the uploads that landed.
    """

    def __init__(self, paths: list[str], tags: dict[str, str]) -> None:
        super().__init__(errno.EEXIST, "objects already exist", paths[0])
        self.paths, self.tags = paths, tags


def _join(parts: Sequence[memoryview | bytes]) -> bytes:
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


def slices(parts: Sequence[memoryview | bytes], size: int) -> Iterator[list[memoryview]]:
    """Regroup buffers into consecutive groups of ``size`` bytes (the last may be smaller)."""
    group: list[memoryview] = []
    room = size
    for p in parts:
        view = memoryview(p)
        while len(view):
            take = view[:room]
            group.append(take)
            view = view[len(take):]
            room -= len(take)
            if room == 0:
                yield group
                group, room = [], size
    if group:
        yield group


def _content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    """Objects under paths of one fsspec filesystem (no rename, no conditional writes).

    Args:
        fs: an fsspec filesystem instance.
        scheme: the URL scheme the user wrote (``memory``, ``gs``...), to print URLs.
    """

    conditional_writes = False
    server_side_copy = False

    def __init__(self, fs: Any, scheme: str) -> None:
        self.fs: Any = fs
        self.scheme = scheme

    def url(self, path: str) -> str:
        """The URL of a path of this store, as a user would write it."""
        return f"{self.scheme}://{path.lstrip('/')}"

    def check_root(self, root: str) -> None:
        """Fail early, with a useful message, when the store cannot hold ``root``."""
        self.ls_names(root)

    # -- reading -----------------------------------------------------------------------

    def ls_names(self, path: str) -> list[str]:
        """Names of the immediate children of ``path`` (objects and prefixes); [] if none."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        base = path.rstrip("/")
        names = []
        for e in entries:
            e = str(e).rstrip("/")
            if e != base:
                names.append(posixpath.basename(e))
        return names

    def find(self, path: str) -> dict[str, int]:
        """Every object under ``path`` (recursive), path -> size."""
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        return {
            str(p): int(info.get("size") or 0)
            for p, info in found.items()
            if info.get("type", "file") != "directory"
        }

    def size(self, path: str) -> int | None:
        """Size of an object, or None if it does not exist."""
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info.get("size") or 0)

    def cat(self, path: str, *, limit: int | None = None) -> bytes:
        """The bytes of one object (FileNotFoundError if missing), at most ``limit``.

        With a limit, one ranged request for ``limit + 1`` bytes: a huge object is never
        downloaded whole to learn that it is too large (FileTooLargeError).
        """
        if limit is None:
            return bytes(self.fs.cat_file(path))
        try:
            data = bytes(self.fs.cat_file(path, start=0, end=limit + 1))
        except OSError as exc:
            # A range of an empty object is unsatisfiable (416): ask its size instead.
            if exc.errno != errno.EINVAL or self.size(path) != 0:
                raise
            return b""
        if len(data) > limit:
            raise FileTooLargeError(path, self.size(path), limit)
        return data

    def cat_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Several objects at once (async filesystems fetch them concurrently)."""
        if not paths:
            return {}
        out = self.fs.cat(list(paths), on_error="return")
        result: dict[str, bytes] = {}
        for p in paths:
            val = out.get(p)
            if isinstance(val, BaseException):
                raise val
            if val is None:
                raise FileNotFoundError(errno.ENOENT, "missing", p)
            result[p] = bytes(val)
        return result

    def read_chunks(self, path: str) -> Iterator[bytes]:
        """An object's bytes in chunks, for hashing large files without holding them."""
        with self.fs.open(path, "rb", block_size=_READ_CHUNK) as f:
            while chunk := f.read(_READ_CHUNK):
                yield bytes(chunk)

    def glob(self, pattern: str) -> list[str]:
        """Paths matching a glob pattern."""
        self.fs.invalidate_cache()
        try:
            return [str(p) for p in self.fs.glob(pattern)]
        except FileNotFoundError:
            return []

    def read_tagged(self, path: str) -> tuple[bytes, str]:
        """An object's bytes and a tag that changes whenever the object does."""
        data = self.cat(path)
        return data, _content_tag(data)

    # -- the ReadStore primitives (storage/base.py) -------------------------------------

    # No rename: a checkpoint appears for readers when its runtime.json is written, so a
    # prefix without it is a commit in progress or a dead writer's, not a damaged one.
    marker_commits = True

    def as_path(self, path: str) -> Path:
        """A URL as the Path-like object the public API returns."""
        from .urlpath import URLPath

        return URLPath(self.url(path))

    def join(self, base: str, *names: str) -> str:
        """A child key."""
        return "/".join([base.rstrip("/"), *names]) if base else "/".join(names)

    def parent(self, path: str) -> str:
        """The containing prefix."""
        return posixpath.dirname(path.rstrip("/"))

    def stat(self, path: str) -> StoreEntry | None:
        """An object ("file"), a non-empty prefix ("dir"), or None."""
        size = self.size(path)
        if size is not None:
            return StoreEntry("file", size)
        return StoreEntry("dir") if self.ls_names(path) else None

    def listdir(self, path: str) -> list[str] | None:
        """Children of a prefix; None when nothing is under it."""
        return self.ls_names(path) or None

    def read(self, path: str, *, limit: int | None = None) -> bytes:
        """One object's bytes (FileNotFoundError if missing), at most ``limit`` of them."""
        return self.cat(path, limit=limit)

    @contextmanager
    def open_dir(self, path: str) -> Iterator[_Prefix]:
        """A prefix: there is nothing to open, nor any symlink to swap in."""
        yield _Prefix(self, path)

    def readlink(self, path: str) -> str | None:
        """Object stores have no symlinks."""
        return None

    def sizes(self, path: str) -> dict[str, int]:
        """Every object under a prefix, relative key -> size, in one listing."""
        prefix = path.rstrip("/") + "/"
        return {p[len(prefix):]: n for p, n in self.find(path).items() if p.startswith(prefix)}

    def error(self, exc: BaseException, action: str, path: str) -> Exception:
        """A store failure as a StorageError naming the URL and the fix."""
        return store_error(exc, action, self.url(path))

    # -- writing -----------------------------------------------------------------------

    def put_many(self, items: Sequence[PutItem], *,
                 fence: Callable[[], None] | None = None) -> dict[str, str]:
        """Upload objects concurrently; returns path -> tag (etag where the store has one).

        ``fence`` runs right before each request and stops the batch by raising (the
        writer's lease check): a writer frozen mid-batch sends nothing once it resumes.
        """
        if len(items) <= 1:
            return {i.path: self._put_one(i, fence) for i in items}
        workers = min(len(items), UPLOAD_CONCURRENCY)
        with concurrent.futures.ThreadPoolExecutor(workers, "ckptwriter-upload") as pool:
            futures = {i.path: pool.submit(self._put_one, i, fence) for i in items}
            return {path: f.result() for path, f in futures.items()}

    def _put_one(self, item: PutItem, fence: Callable[[], None] | None = None) -> str:
        if item.copy_from is not None:
            raise ValueError("this store cannot copy a prefix server-side")
        data = _join(item.parts)
        if fence is not None:
            fence()
        self.fs.pipe_file(item.path, data)
        return _content_tag(data)

    def put(self, path: str, data: bytes) -> str:
        """Upload one small object; it replaces any previous one whole."""
        return self.put_many([PutItem(path, [data])])[path]

    def create(self, path: str, data: bytes) -> str:
        """Write an object only if none exists (FileExistsError otherwise); returns its tag.

        This store has no conditional write: the check and the write are atomic only for
        writers in this process.
        """
        with _CREATE_LOCK:
            if self.size(path) is not None:
                raise FileExistsError(errno.EEXIST, "object exists", path)
            self.fs.pipe_file(path, data)
        return _content_tag(data)

    def replace_if(self, path: str, data: bytes, tag: str) -> str:
        """Replace an object only if it still has ``tag`` (FileExistsError if it changed)."""
        with _CREATE_LOCK:
            try:
                _, current = self.read_tagged(path)
            except FileNotFoundError:
                raise FileExistsError(errno.EEXIST, "object was removed", path) from None
            if current != tag:
                raise FileExistsError(errno.EEXIST, "object changed", path)
            self.fs.pipe_file(path, data)
        return _content_tag(data)

    def tag(self, path: str) -> str | None:
        """The tag :meth:`read_tagged` and the writes return for an object; None if none."""
        try:
            return self.read_tagged(path)[1]
        except FileNotFoundError:
            return None

    def abort_uploads(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under ``prefix``; how many (none here)."""
        return 0

    def rm(self, paths: Sequence[str]) -> None:
        """Remove objects; missing ones are fine."""
        for p in paths:
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass
        for p in paths:
            self.fs.invalidate_cache(p)

    def rm_tree(self, path: str) -> None:
        """Remove every object under a prefix."""
        self.rm(sorted(self.find(path)))


def store_error(exc: BaseException, action: str, url: str) -> StorageError:
    """A :class:`StorageError` that names the URL, the cause and the fix."""
    name = type(exc).__name__
    text = str(exc) or name
    bucket = urlsplit(url).netloc
    if name in {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        hint = (
            "no usable credentials were found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or pass key/secret in storage options)"
        )
    elif name in {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError"} or (
        isinstance(exc, OSError) and exc.errno in {errno.ECONNREFUSED, errno.EHOSTUNREACH}
    ):
        hint = (
            "the object store cannot be reached: check the network and, for an "
            "S3-compatible store, AWS_ENDPOINT_URL"
        )
    elif isinstance(exc, FileNotFoundError) and (
        "bucket" in text.lower() or action == "opening"
    ):
        text = f"bucket {bucket!r} does not exist (or these credentials cannot see it)"
        hint = (
            f"create it (e.g. `aws s3 mb s3://{bucket}`) or fix the bucket name in the URL; "
            "for an S3-compatible store, check AWS_ENDPOINT_URL"
        )
    elif isinstance(exc, PermissionError):
        hint = (
            f"access to {bucket!r} was denied: check the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE) and that they may read, write and delete objects under this prefix"
        )
    else:
        hint = "check the URL, the credentials and the store"
    return StorageError(f"{text} while {action} {url}: {hint}")
