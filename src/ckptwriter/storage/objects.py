"""The few object-store operations checkpoints need, over any fsspec filesystem.

fsspec and s3fs are untyped: every ``Any`` stays in this module, behind
:class:`ObjectStore` (any fsspec filesystem) and :class:`S3ObjectStore` (s3fs, which adds
conditional writes, concurrent multipart uploads and a server-side copy of a byte range).

Error handling:
    Every method lets the filesystem's ``OSError`` (or botocore error) through;
    :func:`store_error` turns one into a :class:`StorageError` that says what to do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import posixpath
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec
import fsspec.asyn

from ..errors import ConfigError, StorageError

__all__ = ["ObjectStore", "PutItem", "S3ObjectStore", "open_store", "store_error"]

# S3 multipart rules: every part but the last is at least 5 MiB, a copied part at most 5 GiB.
_S3_MIN_PART = 5 * 2**20
_S3_MAX_COPY_PART = 4 * 2**30
# Parts of a large upload: big enough that per-request overhead is small, small enough
# that joining one part's chunks (a memcpy under the GIL) costs the loop ~1 ms.
PART_BYTES = 8 * 2**20
# Below this a memory file goes up in one PUT; above it, as concurrent multipart parts.
MULTIPART_THRESHOLD = 16 * 2**20
# Requests in flight at once for one checkpoint (parts and small objects together).
UPLOAD_CONCURRENCY = 8
_READ_CHUNK = 4 * 2**20
# Stores without conditional writes get check-then-write under this lock: atomic for
# writers in this process (all that memory:// has), best effort across machines.
_CREATE_LOCK = threading.Lock()


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

    @property
    def nbytes(self) -> int:
        """Bytes uploaded from this process (the copied prefix is not counted)."""
        return sum(len(p) for p in self.parts)


def _join(parts: Sequence[memoryview | bytes]) -> bytes:
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


def _slices(parts: Sequence[memoryview | bytes], size: int) -> Iterator[list[memoryview]]:
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

    def cat(self, path: str) -> bytes:
        """The bytes of one object (FileNotFoundError if missing)."""
        data = self.fs.cat_file(path)
        return bytes(data)

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

    # -- writing -----------------------------------------------------------------------

    def put_many(self, items: Sequence[PutItem]) -> dict[str, str]:
        """Upload objects concurrently; returns path -> tag (etag where the store has one)."""
        if len(items) <= 1:
            return {i.path: self._put_one(i) for i in items}
        workers = min(len(items), UPLOAD_CONCURRENCY)
        with concurrent.futures.ThreadPoolExecutor(workers, "ckptwriter-upload") as pool:
            futures = {i.path: pool.submit(self._put_one, i) for i in items}
            return {path: f.result() for path, f in futures.items()}

    def _put_one(self, item: PutItem) -> str:
        if item.copy_from is not None:
            raise ValueError("this store cannot copy a prefix server-side")
        data = _join(item.parts)
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


class S3ObjectStore(ObjectStore):
    """An S3 bucket through s3fs: conditional writes, concurrent multipart, UploadPartCopy.

    All requests run on s3fs's own event loop thread; the calling (worker) thread waits.
    """

    conditional_writes = True
    server_side_copy = True

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return str(bucket), str(key)

    def _sync(self, coro_fn: Any, *args: Any) -> Any:
        return fsspec.asyn.sync(self.fs.loop, coro_fn, *args)

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One S3 request from this (worker) thread, on s3fs's event loop."""
        return fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def check_root(self, root: str) -> None:
        bucket, _ = self._split(root)
        self._call("head_bucket", Bucket=bucket)

    def read_tagged(self, path: str) -> tuple[bytes, str]:
        bucket, key = self._split(path)

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return bytes(data), str(resp["ETag"])

        result: tuple[bytes, str] = self._sync(get)
        return result

    def create(self, path: str, data: bytes) -> str:
        bucket, key = self._split(path)
        resp = self._call("put_object", Bucket=bucket, Key=key, Body=data,
                          IfNoneMatch="*")
        self.fs.invalidate_cache(path)
        return str(resp["ETag"])

    def replace_if(self, path: str, data: bytes, tag: str) -> str:
        bucket, key = self._split(path)
        try:
            resp = self._call("put_object", Bucket=bucket, Key=key,
                              Body=data, IfMatch=tag)
        except FileNotFoundError:
            raise FileExistsError(errno.EEXIST, "object was removed", path) from None
        except OSError as exc:
            # s3fs maps 412 PreconditionFailed on IfMatch to EINVAL.
            if exc.errno == errno.EINVAL or "pre-condition" in str(exc).lower():
                raise FileExistsError(errno.EEXIST, "object changed", path) from exc
            raise
        self.fs.invalidate_cache(path)
        return str(resp["ETag"])

    def put_many(self, items: Sequence[PutItem]) -> dict[str, str]:
        result: dict[str, str] = self._sync(self._aput_many, list(items))
        for i in items:
            self.fs.invalidate_cache(i.path)
        return result

    async def _aput_many(self, items: list[PutItem]) -> dict[str, str]:
        sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)
        tags = await asyncio.gather(*(self._aput(i, sem) for i in items))
        return {i.path: t for i, t in zip(items, tags, strict=True)}

    async def _aput(self, item: PutItem, sem: asyncio.Semaphore) -> str:
        bucket, key = self._split(item.path)
        if item.copy_from is None and item.nbytes <= MULTIPART_THRESHOLD:
            async with sem:
                resp = await self.fs._call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=_join(item.parts)
                )
            return str(resp["ETag"])
        mpu = await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = mpu["UploadId"]
        try:
            jobs: list[Any] = []
            number = 1
            if item.copy_from is not None:
                src = item.copy_from
                sbucket, skey = self._split(src.path)
                n = -(-src.nbytes // _S3_MAX_COPY_PART)
                step = -(-src.nbytes // n)
                for start in range(0, src.nbytes, step):
                    end = min(start + step, src.nbytes) - 1
                    jobs.append(self._acopy_part(
                        sem, bucket, key, upload_id, number,
                        {"Bucket": sbucket, "Key": skey}, f"bytes={start}-{end}", src.etag,
                    ))
                    number += 1
            for group in _slices(item.parts, PART_BYTES):
                jobs.append(self._aupload_part(sem, bucket, key, upload_id, number, group))
                number += 1
            etags = await asyncio.gather(*jobs)
            resp = await self.fs._call_s3(
                "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [
                    {"PartNumber": n + 1, "ETag": e} for n, e in enumerate(etags)
                ]},
            )
        except BaseException:
            # An abandoned multipart upload is billed until aborted: always abort it.
            await asyncio.shield(self._aabort(bucket, key, upload_id))
            raise
        return str(resp["ETag"])

    async def _aupload_part(
        self, sem: asyncio.Semaphore, bucket: str, key: str, upload_id: str, number: int,
        group: list[memoryview],
    ) -> str:
        async with sem:
            # Joined here, inside the semaphore, so at most UPLOAD_CONCURRENCY parts are
            # copied into memory at once.
            resp = await self.fs._call_s3(
                "upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                PartNumber=number, Body=b"".join(group),
            )
        return str(resp["ETag"])

    async def _acopy_part(
        self, sem: asyncio.Semaphore, bucket: str, key: str, upload_id: str, number: int,
        source: dict[str, str], byte_range: str, etag: str,
    ) -> str:
        async with sem:
            resp = await self.fs._call_s3(
                "upload_part_copy", Bucket=bucket, Key=key, UploadId=upload_id,
                PartNumber=number, CopySource=source, CopySourceRange=byte_range,
                # The carried-forward sha256 is only valid for these exact bytes.
                CopySourceIfMatch=etag,
            )
        return str(resp["CopyPartResult"]["ETag"])

    async def _aabort(self, bucket: str, key: str, upload_id: str) -> None:
        # Best effort: the error that made us abort is the one worth reporting.
        with contextlib.suppress(Exception):
            await self.fs._call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id
            )

    def can_copy_prefix(self, nbytes: int) -> bool:
        """UploadPartCopy needs every part but the last to be at least 5 MiB."""
        return nbytes >= _S3_MIN_PART

    def etag_and_size(self, path: str) -> tuple[str, int] | None:
        """(ETag, size) of an object, or None if it does not exist."""
        bucket, key = self._split(path)
        try:
            resp = self._call("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return str(resp["ETag"]), int(resp["ContentLength"])

    def rm(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        self.fs.rm(list(paths))
        for p in paths:
            self.fs.invalidate_cache(p)


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> tuple[ObjectStore, str]:
    """The store and root path of an fsspec URL (``s3://bucket/prefix``, ``memory://x``).

    Raises:
        ConfigError: the URL's scheme has no fsspec implementation installed.
    """
    scheme = urlsplit(url).scheme
    options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        extra = " (pip install 'ckptwriter[s3]')" if scheme in {"s3", "s3a"} else ""
        raise ConfigError(
            f"cannot open {url!r}: {exc}. Install the fsspec backend for {scheme}://{extra} "
            "or use a local checkpoint_dir"
        ) from exc
    # "" for a store's root (memory://), so children join as "/name", never "//name".
    path = str(path).rstrip("/")
    cls = S3ObjectStore if type(fs).__name__ == "S3FileSystem" else ObjectStore
    return cls(fs, scheme), path


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
