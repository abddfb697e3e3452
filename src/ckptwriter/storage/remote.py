"""Atomic checkpoint commit on object storage (any fsspec URL: s3://, gs://, memory://).

Object stores have no rename, so the protocol (DESIGN.md) is built on the one atomic
thing they do have, a single-object PUT:

1. Every object of ``ep_N/`` is uploaded under its final prefix, concurrently
   (large memory files as concurrent multipart parts).
2. ``ep_N/runtime.json`` is uploaded last: it is the commit marker. A prefix without it
   does not exist for readers, and the next writer's :meth:`RemoteStorage.open` removes it.
3. ``latest.json`` is replaced by one PUT (there is no ``latest`` symlink).
4. Deletion removes the marker first, so a checkpoint vanishes for readers in one step;
   what a crash leaves behind is an uncommitted prefix, cleaned like any other.

Incremental memory: on S3 the unchanged prefix of the previous memory file is copied
server-side (UploadPartCopy with a byte range, guarded by the source ETag) and only the
new bytes are uploaded. Other stores, and S3 for previous files under 5 MiB (the
multipart minimum part size), get a full upload.

Single writer: a ``.lock`` object with the owner, a token and an expiry that a
heartbeat thread extends. On S3 it is created with ``If-None-Match: *`` and extended
with ``If-Match: <etag>``, so two writers cannot both hold it. Stores without
conditional writes get a check-then-write, atomic only within one process
(see docs/OBJECT_STORAGE.md for the limits).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from .. import layout
from ..errors import CheckpointError, DirectoryLockedError
from ..manifest import commit_documents
from ..retention import CheckpointRecord
from ..snapshot import CapturedSnapshot
from .base import CommitOutcome, MemoryState
from .objects import CopySource, ObjectStore, PutItem, S3ObjectStore, open_store, store_error
from .remote_read import scan_store

__all__ = ["DEFAULT_LOCK_TTL", "RemoteStorage"]

log = logging.getLogger("ckptwriter")
_T = TypeVar("_T")

# A crashed writer's lock blocks a new writer for at most this long; a live writer
# extends it every third of it, so it survives two failed heartbeats in a row.
DEFAULT_LOCK_TTL = 60.0


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
    STEPS = (
        "objects_written", "marker_written", "latest_written", "marker_deleted", "deleted",
    )

    def __init__(self, url: str, *, lock_ttl: float = DEFAULT_LOCK_TTL,
                 **storage_options: Any) -> None:
        self.store: ObjectStore
        self.store, self.root = open_store(url, storage_options)
        self.location = self.store.url(self.root)
        self.lock_ttl = float(lock_ttl)
        self._lock_path = f"{self.root}/{layout.LOCK_FILE}"
        self._lock_token = ""
        self._lock_tag: str | None = None
        self._lock_expires = 0.0
        self._lock_lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._renewing = threading.Lock()
        self._committed: set[str] = set()
        # ETag of the memory object last written, so a server-side copy of its prefix
        # is done only if the object still holds exactly the bytes hashed before.
        self._mem_etag: dict[str, str] = {}

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

    def open(self) -> list[CheckpointRecord]:
        self._guard("opening", self.location, lambda: self.store.check_root(self.root))
        self._guard("taking the writer lock of", self.location, self._acquire_lock)
        try:
            return self._guard("opening", self.location, self._clean_and_list)
        except BaseException:
            self.close()
            raise

    def _clean_and_list(self) -> list[CheckpointRecord]:
        sizes = self.store.find(self.root)
        prefix = self.root + "/"
        by_ckpt: dict[str, list[str]] = {}
        for path in sizes:
            if not path.startswith(prefix):
                continue
            head, sep, rest = path[len(prefix):].partition("/")
            if sep and layout.parse_checkpoint_name(head) is not None:
                by_ckpt.setdefault(head, []).append(rest)
        for name, files in by_ckpt.items():
            if layout.RUNTIME_JSON not in files:
                # No commit marker: a writer died mid-checkpoint (or mid-delete).
                log.info("removing uncommitted checkpoint prefix %s/%s", self.location, name)
                self.store.rm([f"{self.root}/{name}/{f}" for f in files])
        infos = scan_store(self.store, self.root)
        self._committed = {i.name for i in infos}
        return [i.record for i in infos if i.complete]

    def close(self) -> None:
        thread, self._heartbeat = self._heartbeat, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self._lock_lost is None and self._lock_tag is not None:
            try:
                _, tag = self.store.read_tagged(self._lock_path)
                if tag == self._lock_tag:
                    self.store.rm([self._lock_path])
            except Exception as exc:
                log.warning("could not release the lock %s (it expires in %.0f s): %s",
                            self.store.url(self._lock_path), self.lock_ttl, exc)
        self._lock_tag = None

    # -- the writer lock -------------------------------------------------------------

    def _lock_body(self, expires_at: float) -> bytes:
        return json.dumps({
            "owner": f"pid {os.getpid()} on {socket.gethostname()}",
            "token": self._lock_token,
            "expires_at": expires_at,
            "ttl_seconds": self.lock_ttl,
        }).encode()

    def _write_lock(self, write: Callable[[bytes], str]) -> str:
        # The expiry is computed before the request, so others never see a later one
        # than we assume; it counts only once the write succeeded.
        expires = time.time() + self.lock_ttl
        tag = write(self._lock_body(expires))
        self._lock_expires = expires
        return tag

    def _acquire_lock(self) -> None:
        self._lock_token = uuid.uuid4().hex
        try:
            self._lock_tag = self._write_lock(partial(self.store.create, self._lock_path))
        except FileExistsError:
            self._lock_tag = self._take_over_stale_lock()
        self._lock_lost = None
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name="ckptwriter-lock-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def _take_over_stale_lock(self) -> str:
        try:
            data, tag = self.store.read_tagged(self._lock_path)
        except FileNotFoundError:
            # Released between our create and our read: try once more.
            return self._write_lock(partial(self.store.create, self._lock_path))
        try:
            held = json.loads(data)
            owner = str(held["owner"])
            expires = float(held["expires_at"])
        except (ValueError, KeyError, TypeError):
            owner, expires = "unknown owner, unreadable lock", float("inf")
        left = expires - time.time()
        if left > 0:
            when = "never" if left == float("inf") else f"in {left:.0f} s"
            lock_url = self.store.url(self._lock_path)
            raise DirectoryLockedError(
                f"Checkpoint directory {self.location} is locked by another writer ({owner}; "
                f"the lock expires {when} unless that writer keeps it alive). Only one writer "
                "may own a checkpoints directory: stop the other run, or use another "
                f"checkpoint_dir. If no writer is running, delete {lock_url}."
            )
        log.warning("taking over the expired lock of %s (%s)", self.location, owner)
        try:
            return self._write_lock(partial(self._replace_lock, tag))
        except FileExistsError:
            raise DirectoryLockedError(
                f"Checkpoint directory {self.location} was just locked by another writer "
                "taking over the same expired lock: stop one of the runs."
            ) from None

    def _replace_lock(self, tag: str, body: bytes) -> str:
        return self.store.replace_if(self._lock_path, body, tag)

    def _renew(self) -> None:
        """Extend the lock (conditional on it being ours); FileExistsError if it is not."""
        # The heartbeat and the pre-marker renewal must not race each other with one tag.
        with self._renewing:
            if self._lock_lost is not None:
                return
            assert self._lock_tag is not None
            try:
                self._lock_tag = self._write_lock(partial(self._replace_lock, self._lock_tag))
            except FileExistsError:
                self._lock_lost = "another writer took over the lock"
                raise

    def _beat(self) -> None:
        while not self._stop.wait(self.lock_ttl / 3):
            try:
                self._renew()
            except FileExistsError:
                return
            except Exception as exc:
                # Transient: the expiry check in _check_lock stops commits if it lasts.
                log.warning("lock heartbeat for %s failed: %s", self.location, exc)

    def _confirm_lock(self) -> None:
        """Renew the lock right before a commit marker: never commit over another writer."""
        self._check_lock()
        try:
            self._renew()
        except FileExistsError:
            pass
        except Exception as exc:
            log.warning("lock renewal for %s failed: %s", self.location, exc)
        self._check_lock()

    def _check_lock(self) -> None:
        if self._lock_lost is None and time.time() >= self._lock_expires:
            self._lock_lost = "its heartbeat could not be renewed before it expired"
        if self._lock_lost is not None:
            raise DirectoryLockedError(
                f"This writer lost the lock on {self.location} ({self._lock_lost}); "
                "another writer may own the directory now. Stop this run and check which "
                "run should write there."
            )

    # -- commit ----------------------------------------------------------------------

    def commit(self, snap: CapturedSnapshot, prev: MemoryState | None) -> CommitOutcome:
        name = layout.checkpoint_name(snap.episode_index)
        prefix = f"{self.root}/{name}"
        self._check_lock()
        try:
            return self._commit(snap, prev, name, prefix)
        except BaseException as exc:
            self._mem_etag.clear()
            if name not in self._committed and self._lock_lost is None:
                # No marker yet: remove what was uploaded (the next open cleans it if
                # this fails too). Without the lock, the prefix may be another writer's.
                with contextlib.suppress(Exception):
                    self.store.rm_tree(prefix)
            if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
                raise store_error(exc, "writing checkpoint", self.store.url(prefix)) from exc
            raise

    def _commit(
        self, snap: CapturedSnapshot, prev: MemoryState | None, name: str, prefix: str
    ) -> CommitOutcome:
        t0 = time.perf_counter()
        if name in self._committed:
            # Same episode written again (a retry): retract the old one, marker first.
            self.delete(name)
        mem = snap.memory
        mem_name = layout.memory_file_name(snap.episode_index)
        mem_path = f"{prefix}/{mem_name}"
        copy_from = self._copy_source(prev, mem.log_id, mem.nbytes)
        start = copy_from.nbytes if copy_from is not None else 0
        views = list(mem.iter_bytes(start))
        items = [PutItem(mem_path, views, copy_from)]
        files: dict[str, dict[str, object]] = {}
        written = mem.nbytes
        for fname, data in (("agent.json", snap.agent_json), *snap.extra_files.items()):
            items.append(PutItem(f"{prefix}/{fname}", [data]))
            files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            written += len(data)
        if copy_from is not None:
            assert prev is not None
            sha = prev.sha.copy()
        else:
            sha = hashlib.sha256()
        for v in views:
            sha.update(v)
        tags = self.store.put_many(items)
        self._mem_etag = {mem_path: tags[mem_path]}
        self._step("objects_written")
        files[mem_name] = {"bytes": mem.nbytes, "sha256": sha.hexdigest()}
        s0 = time.perf_counter()
        runtime, latest_json = commit_documents(snap, name, mem_name, files)
        serialize_s = time.perf_counter() - s0
        # The lock may have been lost while uploading: never commit over another writer.
        self._confirm_lock()
        self.store.put(f"{prefix}/{layout.RUNTIME_JSON}", runtime)
        written += len(runtime)
        self._committed.add(name)
        self._step("marker_written")
        total = time.perf_counter() - t0
        incremental = copy_from is not None
        return CommitOutcome(
            name=name, path=self.store.url(prefix), bytes_written=written,
            entries_serialized=mem.entries - (prev.entries if incremental and prev else 0),
            bytes_serialized=mem.nbytes - start, incremental=incremental,
            serialize_seconds=serialize_s, write_seconds=total - serialize_s,
            memory=MemoryState(log_id=mem.log_id, entries=mem.entries, nbytes=mem.nbytes,
                               location=mem_path, sha=sha),
            record=CheckpointRecord(name, snap.episode_index, snap.val_score),
            latest_json=latest_json,
        )

    def _copy_source(self, prev: MemoryState | None, log_id: str, nbytes: int) -> CopySource | None:
        """The previous memory file to copy server-side, if the store can and it is intact."""
        if (
            prev is None
            or prev.log_id != log_id
            or prev.nbytes > nbytes
            or not isinstance(self.store, S3ObjectStore)
            or not self.store.can_copy_prefix(prev.nbytes)
        ):
            return None
        etag = self._mem_etag.get(prev.location)
        head = self.store.etag_and_size(prev.location)
        if etag is None or head is None or head != (etag, prev.nbytes):
            return None
        return CopySource(prev.location, prev.nbytes, etag)

    # -- pointer ---------------------------------------------------------------------

    def set_latest(self, outcome: CommitOutcome) -> None:
        path = f"{self.root}/{layout.LATEST_JSON}"
        self._guard("updating latest.json in", self.location,
                    lambda: self.store.put(path, outcome.latest_json))
        self._step("latest_written")

    # -- deletion --------------------------------------------------------------------

    def delete(self, name: str) -> None:
        prefix = f"{self.root}/{name}"
        url = self.store.url(prefix)
        marker = f"{prefix}/{layout.RUNTIME_JSON}"
        self._guard("deleting checkpoint", url, lambda: self.store.rm([marker]))
        self._committed.discard(name)
        self._step("marker_deleted")
        self._guard("deleting checkpoint", url, lambda: self.store.rm_tree(prefix))
        self._step("deleted")
