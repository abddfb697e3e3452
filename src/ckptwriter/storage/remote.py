"""Atomic checkpoint primitives on object storage (any fsspec URL: s3://, gs://, memory://).

Object stores have no rename, so the protocol (DESIGN.md) is built on the one atomic
thing they do have, a single-object PUT:

1. :meth:`RemoteStorage.begin` returns a :class:`RemotePending` whose ``write`` uploads
   files under the checkpoint's final prefix, concurrently (large memory files as
   concurrent multipart parts; a reused prefix is copied server-side on S3).
2. ``finalize`` uploads ``ep_N/runtime.json`` last: it is the commit marker. A prefix
   without it does not exist for readers, and the next writer's :meth:`RemoteStorage.open`
   removes it.
3. ``latest.json`` is replaced by one PUT (there is no ``latest`` symlink); so is
   ``best.json`` when a commit beats the best score (removed once nothing has a score).
4. Deletion removes the marker first, so a checkpoint vanishes for readers in one step;
   what a crash leaves behind is an uncommitted prefix, cleaned like any other.

Re-committing a name that is committed (a retry, a resume in place re-committing the
episode it resumed from) never removes or overwrites the existing checkpoint's files.
If they are byte-identical to the new ones (same names, sizes and, from the two markers,
sha256), nothing is uploaded and only the marker is replaced, in one PUT: readers and a
crash at any point see the old or the new marker over the same files. If they differ, the
commit is refused with a :class:`StorageError` naming the episode and the fix: several
objects cannot be swapped at once, so a crash or a network cut midway would leave
neither version, and staging a copy elsewhere would not help readers that open
``ep_N`` by name. A committed name whose files are missing or truncated loads for
nobody, so it is overwritten like a new one.

Fencing: every mutating request first checks this writer's lease by its monotonic
deadline (no request; see :mod:`ckptwriter.storage.object_lock`). Markers are written
after a conditional renewal of the lock, and conditionally themselves (``If-None-Match``
for a new name, ``If-Match`` on the replaced marker's ETag); ``latest.json`` and
``best.json`` only with ``If-Match`` on the ETag this writer last wrote or read at open
(a removal of ``best.json`` is fenced like a deletion); a commit starts, and a
deletion runs, only after the store confirmed the lock still carries this writer's token
(one HEAD, skipped for a deletion within a second of such a confirmation). A writer that
lost its lease or its lock therefore changes nothing. Each upload checks the lease again
right before its request, and checkpoint files are uploaded with ``If-None-Match: *``:
a request already on the wire when its writer froze cannot overwrite what the writer
that took over uploaded since (a file left by such a request is removed, under the
confirmed lock, and uploaded again). The one window left is a marker or pointer request
of a writer frozen between its last check and the request actually leaving, which S3,
lacking multi-object conditions, cannot close. A 412 whose object holds exactly what was sent is
a retried request whose first attempt landed, not a conflict.

At open, under the lock, unfinished multipart uploads below the prefix (whose abort ran
while the network was down, or whose process was killed) are aborted.

Reuse: on S3 the unchanged prefix of the previous memory or log file is copied
server-side (UploadPartCopy with a byte range, guarded by the source ETag), and an
unchanged file whole (CopyObject, guarded the same way); see :meth:`RemoteStorage.can_reuse`.

Single writer: see :mod:`ckptwriter.storage.object_lock`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from .. import layout
from ..errors import CheckpointError
from .base import ReuseToken
from .location import open_object_store
from .object_lock import DEFAULT_LOCK_TTL, ObjectLock
from .objects import ObjectStore, store_error
from .remote_existing import read_existing
from .remote_pending import RemotePending
from .s3 import S3ObjectStore

__all__ = ["DEFAULT_LOCK_TTL", "RemotePending", "RemoteStorage"]

log = logging.getLogger("ckptwriter")
_T = TypeVar("_T")


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
    # After latest_written, only when best moves or goes (see LocalStorage.BEST_STEPS).
    BEST_STEPS = ("best_written", "best_removed")

    def __init__(self, url: str, *, lock_ttl: float = DEFAULT_LOCK_TTL,
                 **storage_options: Any) -> None:
        self.store: ObjectStore
        self.store, self.root = open_object_store(url, storage_options)
        self.location = self.store.url(self.root)
        self.lock_ttl = float(lock_ttl)
        self._lock = ObjectLock(
            self.store, f"{self.root}/{layout.LOCK_FILE}", self.location, self.lock_ttl
        )
        # Names whose marker may exist (a failed marker PUT may have landed): begin()
        # of one of them reads what is there before anything is written.
        self._committed: set[str] = set()
        # latest.json / best.json -> the ETag this writer wrote or read at open.
        self._pointer_tags: dict[str, str | None] = {}
        # Deletions right after a commit ride on the lock renewal it just made: another
        # writer can take the lock over only once it looks expired, ttl later.
        self._proof_age = min(1.0, self.lock_ttl / 10)
        # Unfinished multipart uploads the last open() aborted.
        self.aborted_uploads = 0

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
        """Check the bucket, take the lock, remove what a dead writer left.

        That is: prefixes without a marker, and unfinished multipart uploads (an abort
        that ran while the network was down leaves one, billed until aborted).

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
        # Under the lock, every unfinished upload below the prefix is a dead writer's.
        self._lock.check()
        aborted = self.store.abort_uploads(self.root)
        if aborted:
            log.info("aborted %d unfinished multipart upload(s) under %s",
                     aborted, self.location)
        self.aborted_uploads = aborted
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
            self._lock.check()
            self.store.rm([f"{self.root}/{name}/{f}" for f in files])
        self._committed = committed
        # A pointer is replaced only from the version this writer saw last.
        self._pointer_tags = {p: self.store.tag(f"{self.root}/{p}")
                              for p in (layout.LATEST_JSON, layout.BEST_JSON)}

    def close(self) -> None:
        """Release the writer lock (if this writer still holds it)."""
        self._lock.release()

    # -- the backend primitives (storage/base.py) ------------------------------------

    def begin(self, name: str) -> RemotePending:
        """Start checkpoint ``name``; its files go straight under ``<root>/<name>/``.

        Raises:
            DirectoryLockedError: this writer lost its lock.
            StorageError: the store could not be read.
        """
        self._guard("writing checkpoint", self.location, self._lock.verify)
        existing = None
        if name in self._committed:
            prefix = f"{self.root}/{name}"
            existing = self._guard("reading", self.store.url(prefix),
                                   lambda: read_existing(self.store, prefix))
            if existing is None:
                self._committed.discard(name)
        return RemotePending(self, name, existing)

    # The server copies a prefix as part of the next upload: nothing to do ahead.
    prepares = False

    def prepare_prefix(self, token: ReuseToken, stop: Callable[[], bool]) -> float | None:
        return None

    def can_reuse(self, token: ReuseToken, *, whole: bool = False) -> bool:
        """True only on S3, for an object still at the token's ETag and size, of at least
        5 MiB to extend it (UploadPartCopy), of any size to copy it whole (CopyObject).

        Raises:
            StorageError: the object's metadata could not be read.
        """
        store = self.store
        if (
            not isinstance(store, S3ObjectStore)
            or len(token.ident) != 1
            or not (whole or store.can_copy_prefix(token.nbytes))
        ):
            return False
        head = self._guard("reading", store.url(token.path),
                           lambda: store.etag_and_size(token.path))
        return head == (token.ident[0], token.nbytes)

    def replace_pointer(self, name: str, pointer_json: bytes, *,
                        pointer: str = layout.LATEST_LINK) -> None:
        """Replace ``latest.json`` or ``best.json`` (naming ``name``): one conditional PUT.

        Raises:
            DirectoryLockedError: this writer lost its lock (the pointer is not moved).
            StorageError: the upload failed.
        """
        self._lock.check()
        key = f"{pointer}.json"
        path = f"{self.root}/{key}"

        def put() -> None:
            # Someone else moving the pointer is no takeover: the holder moves it on.
            self._pointer_tags[key] = self._lock.put(
                path, pointer_json, self._pointer_tags.get(key), retake=True)

        self._guard(f"updating {key} in", self.location, put)
        self._step(f"{pointer}_written")

    def remove_pointer(self, pointer: str) -> None:
        """Remove ``best.json`` once no checkpoint has a score (fenced like a deletion).

        Raises:
            DirectoryLockedError: this writer lost its lock (nothing is removed).
            StorageError: the removal failed.
        """
        key = f"{pointer}.json"

        def rm() -> None:
            self._lock.verify(max_age=self._proof_age)
            self.store.rm([f"{self.root}/{key}"])

        self._guard(f"removing {key} in", self.location, rm)
        self._pointer_tags[key] = None
        self._step(f"{pointer}_removed")

    def delete(self, name: str) -> None:
        """Remove the marker (the checkpoint is gone for readers), then the rest.

        Raises:
            DirectoryLockedError: this writer lost its lock (nothing is removed).
            StorageError: a removal failed (an unmarked prefix is cleaned at the next open).
        """
        prefix = f"{self.root}/{name}"
        url = self.store.url(prefix)
        marker = f"{prefix}/{layout.RUNTIME_JSON}"
        self._guard("deleting checkpoint", url,
                    lambda: self._lock.verify(max_age=self._proof_age))
        self._guard("deleting checkpoint", url, lambda: self.store.rm([marker]))
        self._committed.discard(name)
        self._step("marker_deleted")
        self._lock.check()
        self._guard("deleting checkpoint", url, lambda: self.store.rm_tree(prefix))
        self._step("deleted")

    def settle(self, *, wait: bool) -> tuple[bool, list[str]]:
        """Nothing runs in the background: a deletion is fenced by the lock, so it is
        done within the commit that holds it."""
        return False, []
