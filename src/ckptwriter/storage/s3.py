"""S3 through s3fs: conditional writes, concurrent multipart uploads, server-side copies.

fsspec and s3fs are untyped: every ``Any`` stays here and in ``objects.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import fsspec.asyn

from .. import layout
from .objects import UPLOAD_CONCURRENCY, ObjectStore, PutConflict, PutItem, _join, slices

__all__ = ["MULTIPART_THRESHOLD", "PART_BYTES", "S3ObjectStore"]

# S3 multipart rules: every part but the last is at least 5 MiB, a copied part at most 5 GiB.
_S3_MIN_PART = 5 * 2**20
_S3_MAX_COPY_PART = 4 * 2**30
# Parts of a large upload: big enough that per-request overhead is small, small enough
# that joining one part's chunks (a memcpy under the GIL) costs the loop ~1 ms.
PART_BYTES = 8 * 2**20
# Below this a memory file goes up in one PUT; above it, as concurrent multipart parts.
MULTIPART_THRESHOLD = 16 * 2**20
# One request to S3 (an upload's, fenced by the writer's lease).
_Call = Callable[..., Awaitable[Any]]


class _Taken(FileExistsError):
    """An exclusive upload found an object there (a 412 on its condition)."""


def _taken(exc: OSError, item: PutItem) -> bool:
    """The 412 of an exclusive upload's If-None-Match: an object is there. Not one of a
    copy source that changed (CopySourceIfMatch), which is no conflict to resolve."""
    if isinstance(exc, FileExistsError):
        return True  # s3fs's own reading of that very condition
    reply = getattr(exc.__cause__, "response", None)
    if not isinstance(reply, dict):
        return False
    err = reply.get("Error", {})
    if err.get("Code") not in {"PreconditionFailed", "412"}:
        return False
    condition = err.get("Condition")
    # A store that names no condition: only a plain upload has no other one.
    return condition == "If-None-Match" if condition else item.copy_from is None


def _precondition_failed(exc: OSError) -> bool:
    """A 412 on a conditional write (s3fs maps it to EINVAL, as it does other errors)."""
    reply = getattr(exc.__cause__, "response", None)
    if isinstance(reply, dict):
        return reply.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}
    return exc.errno == errno.EINVAL or "pre-condition" in str(exc).lower()


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
        try:
            resp = self._call("put_object", Bucket=bucket, Key=key, Body=data,
                              IfNoneMatch="*")
        except OSError as exc:
            # s3fs maps a 412 to FileExistsError only if the reply names the condition.
            if isinstance(exc, FileExistsError) or not _precondition_failed(exc):
                raise
            raise FileExistsError(errno.EEXIST, "object exists", path) from exc
        self.fs.invalidate_cache(path)
        return str(resp["ETag"])

    def tag(self, path: str) -> str | None:
        found = self.etag_and_size(path)
        return None if found is None else found[0]

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload of a checkpoint file of ``prefix``.

        Only ``prefix/ep_N/<file>``: the lock covers this directory's checkpoints, not
        another run's directory nested below it (``prefix/exp2/ep_N/...``), whose
        uploads may be live.
        """
        bucket, key = self._split(prefix)
        base = key.strip("/")
        args: dict[str, str] = {"Bucket": bucket}
        if base:
            args["Prefix"] = base + "/"
        aborted = 0
        while True:
            page = self._call("list_multipart_uploads", **args)
            for up in page.get("Uploads", []):
                rest = up["Key"][len(base) + 1:] if base else up["Key"]
                parts = rest.split("/")
                if len(parts) != 2 or layout.parse_checkpoint_name(parts[0]) is None:
                    continue
                self._call("abort_multipart_upload", Bucket=bucket, Key=up["Key"],
                           UploadId=up["UploadId"])
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            args["KeyMarker"] = page["NextKeyMarker"]
            args["UploadIdMarker"] = page["NextUploadIdMarker"]

    def replace_if(self, path: str, data: bytes, tag: str) -> str:
        bucket, key = self._split(path)
        try:
            resp = self._call("put_object", Bucket=bucket, Key=key,
                              Body=data, IfMatch=tag)
        except FileNotFoundError:
            raise FileExistsError(errno.EEXIST, "object was removed", path) from None
        except OSError as exc:
            if _precondition_failed(exc):
                raise FileExistsError(errno.EEXIST, "object changed", path) from exc
            raise
        self.fs.invalidate_cache(path)
        return str(resp["ETag"])

    def put_many(self, items: Sequence[PutItem], *,
                 fence: Callable[[], None] | None = None) -> dict[str, str]:
        result: dict[str, str] = self._sync(self._aput_many, list(items), fence)
        for i in items:
            self.fs.invalidate_cache(i.path)
        return result

    async def _aput_many(self, items: list[PutItem],
                         fence: Callable[[], None] | None) -> dict[str, str]:
        sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def call(op: str, **kw: Any) -> Any:
            # Right before each request, after any wait for a slot: a writer frozen
            # mid-batch past its lease sends nothing more once it runs again.
            if fence is not None:
                fence()
            return await self.fs._call_s3(op, **kw)

        # Every upload runs to its end (none keeps going unobserved after a failure).
        done = await asyncio.gather(*(self._aput(i, sem, call) for i in items),
                                    return_exceptions=True)
        tags = {i.path: t for i, t in zip(items, done, strict=True) if isinstance(t, str)}
        failed = [e for e in done if isinstance(e, BaseException)]
        taken = [e.filename for e in failed if isinstance(e, _Taken)]
        for e in failed:
            if not isinstance(e, _Taken):
                raise e
        if taken:
            raise PutConflict(taken, tags)
        return tags

    async def _aput(self, item: PutItem, sem: asyncio.Semaphore, call: _Call) -> str:
        try:
            return await self._aput_one(item, sem, call)
        except OSError as exc:
            if item.exclusive and _taken(exc, item):
                raise _Taken(errno.EEXIST, "object exists", item.path) from exc
            raise

    async def _aput_one(self, item: PutItem, sem: asyncio.Semaphore, call: _Call) -> str:
        bucket, key = self._split(item.path)
        # What makes the object appear is conditional for an exclusive upload.
        cond: dict[str, str] = {"IfNoneMatch": "*"} if item.exclusive else {}
        if item.copy_from is None and item.nbytes <= MULTIPART_THRESHOLD:
            async with sem:
                resp = await call(
                    "put_object", Bucket=bucket, Key=key, Body=_join(item.parts), **cond
                )
            return str(resp["ETag"])
        src = item.copy_from
        if src is not None and item.nbytes == 0 and src.nbytes <= _S3_MAX_COPY_PART:
            # An unchanged file whole: one server-side copy, not a byte uploaded.
            sbucket, skey = self._split(src.path)
            async with sem:
                resp = await call(
                    "copy_object", Bucket=bucket, Key=key,
                    CopySource={"Bucket": sbucket, "Key": skey}, CopySourceIfMatch=src.etag,
                    **cond,
                )
            return str(resp["CopyObjectResult"]["ETag"])
        mpu = await call("create_multipart_upload", Bucket=bucket, Key=key)
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
                        sem, call, bucket, key, upload_id, number,
                        {"Bucket": sbucket, "Key": skey}, f"bytes={start}-{end}", src.etag,
                    ))
                    number += 1
            for group in slices(item.parts, PART_BYTES):
                jobs.append(self._aupload_part(sem, call, bucket, key, upload_id, number, group))
                number += 1
            # Every part runs to its end before an abort: a part still in flight when
            # the upload is aborted may leave storage behind.
            done = await asyncio.gather(*jobs, return_exceptions=True)
            for e in done:
                if isinstance(e, BaseException):
                    raise e
            etags = [str(e) for e in done]
            resp = await call(
                "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [
                    {"PartNumber": n + 1, "ETag": e} for n, e in enumerate(etags)
                ]}, **cond,
            )
        except BaseException:
            # An abandoned multipart upload is billed until aborted: always abort it.
            await asyncio.shield(self._aabort(bucket, key, upload_id))
            raise
        return str(resp["ETag"])

    async def _aupload_part(
        self, sem: asyncio.Semaphore, call: _Call, bucket: str, key: str, upload_id: str,
        number: int, group: list[memoryview],
    ) -> str:
        async with sem:
            # Joined here, inside the semaphore, so at most UPLOAD_CONCURRENCY parts are
            # copied into memory at once.
            resp = await call(
                "upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                PartNumber=number, Body=b"".join(group),
            )
        return str(resp["ETag"])

    async def _acopy_part(
        self, sem: asyncio.Semaphore, call: _Call, bucket: str, key: str, upload_id: str,
        number: int, source: dict[str, str], byte_range: str, etag: str,
    ) -> str:
        async with sem:
            resp = await call(
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
