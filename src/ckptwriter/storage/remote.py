"""Atomic checkpoint primitives on object storage (any fsspec URL: s3://, gs://, memory://).

Object stores have no rename, so the protocol (DESIGN.md) is built on the one atomic
thing they do have, a single-object PUT:

1. :meth:`RemoteStorage.begin` returns a :class:`RemotePending` whose ``write`` uploads
   files under the checkpoint's final prefix, concurrently (large memory files as
   concurrent multipart parts; a reused prefix is copied server-side on S3).
2. ``finalize`` uploads ``ep_N/runtime.json`` last: it is the commit marker. A prefix
   without it does not exist for readers, and the next writer's :meth:`RemoteStorage.open`
   removes it.
3. ``latest.json`` is replaced by one PUT (there is no ``latest`` symlink).
4. Deletion removes the marker first, so a checkpoint vanishes for readers in one step;
   what a crash leaves behind is an uncommitted prefix, cleaned like any other.

Reuse: on S3 the unchanged prefix of the previous memory file is copied server-side
(UploadPartCopy with a byte range, guarded by the source ETag) and only the new bytes are
uploaded. Other stores, and S3 for previous files under 5 MiB (the multipart minimum part
size), get a full upload: :meth:`RemoteStorage.can_reuse` says so.

Single writer: see :mod:`ckptwriter.storage.object_lock`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import layout
from ..errors import CheckpointError, DirectoryLockedError
from .base import FileSpec, ReuseToken
from .location import open_object_store
from .object_lock import DEFAULT_LOCK_TTL, ObjectLock
from .objects import CopySource, ObjectStore, PutItem, store_error
from .s3 import S3ObjectStore

__all__ = ["DEFAULT_LOCK_TTL", "RemotePending", "RemoteStorage"]

log = logging.getLogger("ckptwriter")
_T = TypeVar("_T")


class RemotePending:
    """A checkpoint being uploaded under its final prefix, invisible until its marker.

    Made by :meth:`RemoteStorage.begin`; see :class:`~ckptwriter.storage.base.PendingCheckpoint`.
    """

    def __init__(self, backend: RemoteStorage, name: str, stale: set[str]) -> None:
        self.name = name
        self._backend = backend
        self._prefix = f"{backend.root}/{name}"
        self._url = backend.store.url(self._prefix)
        # Objects of a retracted checkpoint of the same name not yet overwritten.
        self._stale = stale
        self._touched = bool(stale)
        self._finalized = False

    def write(self, files: Sequence[FileSpec]) -> dict[str, ReuseToken]:
        """Upload files concurrently in one batch; a token per file (its path and ETag).

        Raises:
            DirectoryLockedError: this writer lost its lock.
            StorageError: an upload failed.
            ValueError: a file reuses bytes :meth:`RemoteStorage.can_reuse` did not accept.
        """
        b = self._backend
        b._lock.check()
        items = [
            PutItem(f"{self._prefix}/{f.name}", f.data, self._copy_source(f.reuse))
            for f in files
        ]
        self._touched = True
        tags = b._guard("writing checkpoint", self._url, lambda: b.store.put_many(items))
        self._stale.difference_update(i.path for i in items)
        return {
            f.name: ReuseToken(i.path, f.nbytes, (tags[i.path],))
            for f, i in zip(files, items, strict=True)
        }

    def _copy_source(self, token: ReuseToken | None) -> CopySource | None:
        if token is None:
            return None
        etag = token.ident[0] if len(token.ident) == 1 else None
        if not isinstance(self._backend.store, S3ObjectStore) or not isinstance(etag, str):
            raise ValueError(f"cannot reuse {token.path} in {self._url}: can_reuse() is False")
        return CopySource(token.path, token.nbytes, etag)

    def finalize(self, marker: bytes) -> str:
        """Renew the lock, then PUT ``runtime.json``: the checkpoint exists from now on.

        Returns:
            the checkpoint's URL.

        Raises:
            DirectoryLockedError: the lock was lost while uploading (nothing is committed).
            StorageError: the marker could not be uploaded.
        """
        b = self._backend
        self._touched = True
        if self._stale:
            b._lock.check()
            b._guard("writing checkpoint", self._url, lambda: b.store.rm(sorted(self._stale)))
            self._stale.clear()
        # The lock may have been lost while uploading: never commit over another writer.
        b._lock.confirm()
        path = f"{self._prefix}/{layout.RUNTIME_JSON}"
        b._guard("writing checkpoint", self._url, lambda: b.store.put(path, marker))
        self._finalized = True
        b._committed.add(self.name)
        b._step("marker_written")
        return self._url

    def discard(self) -> None:
        """Remove what was uploaded, marker first; never raises (the next open cleans up)."""
        if self._finalized or not self._touched:
            return
        try:
            self._backend._lock.check()
        except DirectoryLockedError:
            # Without the lock, the prefix may be another writer's now.
            return
        store = self._backend.store
        with contextlib.suppress(Exception):
            # A marker PUT that failed ambiguously may have landed: hide it first.
            store.rm([f"{self._prefix}/{layout.RUNTIME_JSON}"])
            store.rm_tree(self._prefix)


class RemoteStorage:
    """A checkpoints prefix on object storage, reached through fsspec.

    Args:
        url: the checkpoints prefix, e.g. ``s3://bucket/runs/exp1/checkpoints``.
        lock_ttl: seconds after which the lock of a writer that stopped heartbeating
            (crashed, partitioned) may be taken over.
        **storage_options: passed to the fsspec filesystem (for s3fs: ``key``,
            ``secret``, ``profile``, ``client_kwargs={"endpoint_url": ...}``...).
            Without them, s3fs reads the usual AWS environment variables and profiles,
            including ``AWS_ENDPOINT_URL`` for S3-compatible stores.

    Raises:
        ConfigError: no fsspec implementation for the URL's scheme is installed.
    """

    # Protocol steps, in order; tests override _step to crash right after any of them.
    # The commit pipeline emits memory_written and files_written through _step.
    STEPS = (
        "memory_written", "files_written", "marker_written", "latest_written",
        "marker_deleted", "deleted",
    )

    def __init__(self, url: str, *, lock_ttl: float = DEFAULT_LOCK_TTL,
                 **storage_options: Any) -> None:
        self.store: ObjectStore
        self.store, self.root = open_object_store(url, storage_options)
        self.location = self.store.url(self.root)
        self.lock_ttl = float(lock_ttl)
        self._lock = ObjectLock(
            self.store, f"{self.root}/{layout.LOCK_FILE}", self.location, self.lock_ttl
        )
        # Names with a commit marker: a new checkpoint of one of them replaces it.
        self._committed: set[str] = set()
        # server-side copy of its prefix is done only if it still holds the hashed bytes.

    def _step(self, name: str) -> None:
        """Called right after each protocol step; a no-op outside fault-injection tests."""

    def _guard(self, action: str, url: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except CheckpointError:
            raise
        except Exception as exc:
            raise store_error(exc, action, url) from exc

    # -- lifecycle -------------------------------------------------------------------

    def claim_as(self, owner: str, token: str) -> None:
        """Hold the lock for ``owner`` (a training process) under ``token``.

        A writer process is replaced when it dies; its replacement, given the same
        token, takes over the lock the dead one left instead of waiting for it to expire.
        """
        self._lock.owner = owner
        self._lock.token = token

    def open(self, is_whole: Callable[[str], bool]) -> None:
        """Check the bucket, take the lock, remove uncommitted prefixes (no marker).

        Args:
            is_whole: unused here: object storage never sets a checkpoint aside (no
                rename), so a crash leaves nothing to put back.

        Raises:
            DirectoryLockedError: another writer owns the prefix.
            StorageError: the store cannot be reached or read.
        """
        self._guard("opening", self.location, lambda: self.store.check_root(self.root))
        self._guard("taking the writer lock of", self.location, self._lock.acquire)
        try:
            self._guard("opening", self.location, self._clean)
        except BaseException:
            self.close()
            raise

    def _clean(self) -> None:
        sizes = self.store.find(self.root)
        prefix = self.root + "/"
        by_ckpt: dict[str, list[str]] = {}
        for path in sizes:
            if not path.startswith(prefix):
                continue
            head, sep, rest = path[len(prefix):].partition("/")
            if sep and layout.parse_checkpoint_name(head) is not None:
                by_ckpt.setdefault(head, []).append(rest)
        committed = set()
        for name, files in by_ckpt.items():
            if layout.RUNTIME_JSON in files:
                committed.add(name)
                continue
            # No commit marker: a writer died mid-checkpoint (or mid-delete).
            log.info("removing uncommitted checkpoint prefix %s/%s", self.location, name)
            self.store.rm([f"{self.root}/{name}/{f}" for f in files])
        self._committed = committed

    def close(self) -> None:
        """Release the writer lock (if this writer still holds it)."""
        self._lock.release()

    # -- the backend primitives (storage/base.py) ------------------------------------

    def begin(self, name: str) -> RemotePending:
        """Start checkpoint ``name``; its files go straight under ``<root>/<name>/``.

        Raises:
            DirectoryLockedError: this writer lost its lock.
            StorageError: a checkpoint of that name could not be retracted.
        """
        self._lock.check()
        stale: set[str] = set()
        if name in self._committed:
            # Same episode written again (a retry): retract the old one, marker first, as
            # the first version did (issue 10 redesigns this: the old one is lost if the
            # new one fails). Its other objects stay until overwritten or finalize, so a
            # reuse token the pipeline checked before begin() can still be copied from.
            prefix = f"{self.root}/{name}"
            url = self.store.url(prefix)
            marker = f"{prefix}/{layout.RUNTIME_JSON}"
            self._guard("replacing checkpoint", url, lambda: self.store.rm([marker]))
            self._committed.discard(name)
            stale = set(self._guard("replacing checkpoint", url,
                                    lambda: self.store.find(prefix)))
        return RemotePending(self, name, stale)

    def can_reuse(self, token: ReuseToken) -> bool:
        """True only on S3, for an object of at least 5 MiB still at the token's ETag and size.

        Raises:
            StorageError: the object's metadata could not be read.
        """
        store = self.store
        if (
            not isinstance(store, S3ObjectStore)
            or len(token.ident) != 1
            or not store.can_copy_prefix(token.nbytes)
        ):
            return False
        head = self._guard("reading", store.url(token.path),
                           lambda: store.etag_and_size(token.path))
        return head == (token.ident[0], token.nbytes)

    def replace_pointer(self, name: str, latest_json: bytes) -> None:
        """Replace ``latest.json`` (naming ``name``) with one PUT.

        Raises:
            StorageError: the upload failed.
        """
        path = f"{self.root}/{layout.LATEST_JSON}"
        self._guard("updating latest.json in", self.location,
                    lambda: self.store.put(path, latest_json))
        self._step("latest_written")

    def delete(self, name: str) -> None:
        """Remove the marker (the checkpoint is gone for readers), then the rest.

        Raises:
            StorageError: a removal failed (an unmarked prefix is cleaned at the next open).
        """
        prefix = f"{self.root}/{name}"
        url = self.store.url(prefix)
        marker = f"{prefix}/{layout.RUNTIME_JSON}"
        self._guard("deleting checkpoint", url, lambda: self.store.rm([marker]))
        self._committed.discard(name)
        self._step("marker_deleted")
        self._guard("deleting checkpoint", url, lambda: self.store.rm_tree(prefix))
        self._step("deleted")
