"""A checkpoint being uploaded to object storage (see :mod:`ckptwriter.storage.remote`
for the protocol, the fencing and why a committed name is never replaced by other bytes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from .. import layout
from ..errors import StorageError
from .base import FileSpec, ReuseToken
from .object_lock import ObjectLock
from .objects import CopySource, ObjectStore, PutConflict, PutItem
from .remote_existing import Existing, manifest_files
from .s3 import S3ObjectStore

__all__ = ["RemotePending"]

_T = TypeVar("_T")


class _Storage(Protocol):
    """What a pending checkpoint uses of its :class:`~ckptwriter.storage.RemoteStorage`."""

    store: ObjectStore
    root: str
    location: str
    _lock: ObjectLock
    _committed: set[str]

    def _step(self, name: str) -> None: ...
    def _guard(self, action: str, url: str, fn: Callable[[], _T]) -> _T: ...


class RemotePending:
    """A checkpoint being uploaded under its final prefix, invisible until its marker.

    Made by :meth:`RemoteStorage.begin`; see :class:`~ckptwriter.storage.base.PendingCheckpoint`.
    Replacing a whole committed checkpoint of the same name uploads nothing: its files
    must be the existing ones, byte for byte, and only the marker is rewritten.
    """

    def __init__(self, backend: _Storage, name: str, existing: Existing | None) -> None:
        self.name = name
        self.prepared_seconds = 0.0  # the server copies prefixes: nothing is made ahead
        self._backend = backend
        self._prefix = f"{backend.root}/{name}"
        self._url = backend.store.url(self._prefix)
        self._existing = existing
        self._touched = False
        self._finalized = False

    @property
    def _keeps_existing(self) -> bool:
        return self._existing is not None and self._existing.files is not None

    def write(self, files: Sequence[FileSpec]) -> dict[str, ReuseToken]:
        """Upload files concurrently in one batch; a token per file (its path and ETag).

        Raises:
            DirectoryLockedError: this writer lost its lock.
            StorageError: an upload failed, or a whole checkpoint of this name exists
                with other files (it is left as it is).
            ValueError: a file reuses bytes :meth:`RemoteStorage.can_reuse` did not accept.
        """
        b = self._backend
        b._lock.check()
        if self._keeps_existing:
            return {f.name: self._kept(f) for f in files}
        # Exclusive: a writer frozen past its lease whose requests were already on the
        # wire when it stopped must not overwrite the files of whoever took over.
        items = [
            PutItem(f"{self._prefix}/{f.name}", f.data, self._copy_source(f.reuse),
                    exclusive=True)
            for f in files
        ]
        self._touched = True
        tags = b._guard("writing checkpoint", self._url, lambda: self._upload(items))
        return {
            f.name: ReuseToken(i.path, f.nbytes, (tags[i.path],))
            for f, i in zip(files, items, strict=True)
        }

    def _upload(self, items: list[PutItem]) -> dict[str, str]:
        b = self._backend
        try:
            return b.store.put_many(items, fence=b._lock.check)
        except PutConflict as conflict:
            # Objects under an uncommitted (or broken) name: a dead writer's, a late
            # request of a writer that lost the lock, or our own first attempt of a
            # retried request. Under the lock, confirmed, they are ours to replace.
            tags = conflict.tags
            b._lock.verify()
            b.store.rm(conflict.paths)
            again = [i for i in items if i.path in set(conflict.paths)]
            try:
                tags.update(b.store.put_many(again, fence=b._lock.check))
            except PutConflict as exc:
                raise StorageError(
                    f"{self.name} in {b.location} is being written by someone else: "
                    f"{b.store.url(exc.paths[0])} reappeared after it was removed. Check "
                    "that only one run writes to this location."
                ) from exc
            return tags

    def _kept(self, f: FileSpec) -> ReuseToken:
        """The existing object stands for ``f`` if it has f's size (finalize checks the
        sha256): a retry, or a resume in place re-committing the checkpoint it resumed."""
        assert self._existing is not None
        assert self._existing.files is not None
        old = self._existing.files.get(f.name)
        if old is None or old[0] != f.nbytes:
            was = "absent" if old is None else f"{old[0]} bytes"
            raise self._refusal(f"{f.name}: {f.nbytes} bytes, the existing one {was}")
        path = f"{self._prefix}/{f.name}"
        store = self._backend.store
        ident = old[1]  # what a store without ETags tags an object with: its sha256
        if isinstance(store, S3ObjectStore) and store.can_copy_prefix(f.nbytes):
            head = self._backend._guard("reading", store.url(path),
                                        lambda: store.etag_and_size(path))
            if head is None or head[1] != f.nbytes:
                raise self._refusal(f"{f.name}: changed since this writer listed it")
            ident = head[0]
        return ReuseToken(path, f.nbytes, (ident,))

    def _refusal(self, why: str) -> StorageError:
        return StorageError(
            f"{self.name} already exists in {self._backend.location} with other content "
            f"({why}). On object storage a committed checkpoint is never replaced by a "
            "different one: its objects cannot all be swapped at once, so a crash or a "
            f"network cut midway would leave neither. The existing {self.name} is kept "
            f"as it is; commit under another episode index, or delete {self._url} first."
        )

    def _copy_source(self, token: ReuseToken | None) -> CopySource | None:
        if token is None:
            return None
        etag = token.ident[0] if len(token.ident) == 1 else None
        if not isinstance(self._backend.store, S3ObjectStore) or not isinstance(etag, str):
            raise ValueError(f"cannot reuse {token.path} in {self._url}: can_reuse() is False")
        return CopySource(token.path, token.nbytes, etag)

    def finalize(self, marker: bytes, *, latest: bytes | None = None) -> str:
        """Renew the lock, then PUT ``runtime.json``: the checkpoint exists from now on.
        (``latest.json`` is a conditional PUT of its own, after the marker.)

        Returns:
            the checkpoint's URL.

        Raises:
            DirectoryLockedError: the lock was lost while uploading (nothing is committed).
            StorageError: the marker could not be uploaded, or it would replace a whole
                checkpoint of this name whose files differ (which is left as it is).
        """
        b = self._backend
        existing = self._existing
        if existing is not None and existing.files is not None:
            new = manifest_files(marker) or {}
            for n in sorted(new.keys() | existing.files.keys()):
                if new.get(n) != existing.files.get(n):
                    raise self._refusal(f"{n}: other bytes" if n in new and n in
                                        existing.files else f"{n}: not in both")
        # The lock may have been lost while uploading: never commit over another writer.
        b._lock.confirm()
        self._touched = True
        # From here the marker may exist even if the PUT reports a failure.
        b._committed.add(self.name)
        path = f"{self._prefix}/{layout.RUNTIME_JSON}"
        tag = existing.tag if existing is not None else None
        b._guard("writing checkpoint", self._url, lambda: b._lock.put(path, marker, tag))
        self._finalized = True
        b._step("marker_written")
        return self._url

    def discard(self) -> None:
        """Remove what was uploaded, marker first; never raises (the next open cleans up).

        A whole checkpoint this one would have replaced is never touched.
        """
        if self._finalized or not self._touched or self._keeps_existing:
            return
        b = self._backend
        try:
            # Without the lock, the prefix may be another writer's now.
            b._lock.verify()
        except Exception:
            return
        with contextlib.suppress(Exception):
            # A marker PUT that failed ambiguously may have landed: hide it first.
            b.store.rm([f"{self._prefix}/{layout.RUNTIME_JSON}"])
            b._committed.discard(self.name)
            b.store.rm_tree(self._prefix)
