"""The single-writer lock of a checkpoints prefix on object storage.

A ``.lock`` object holds the owner, a token and an expiry that a heartbeat thread
extends. On S3 it is created with ``If-None-Match: *`` and extended with
``If-Match: <etag>``, so two writers cannot both hold it. Stores without conditional
writes get a check-then-write, atomic only within one process (see
docs/OBJECT_STORAGE.md for the limits).

Error handling:
    :meth:`ObjectLock.acquire` raises :class:`DirectoryLockedError` when another writer
    holds a live lock; store failures pass through for the caller to wrap.
    :meth:`ObjectLock.check` and :meth:`ObjectLock.confirm` raise
    :class:`DirectoryLockedError` once the lock is lost.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial

from ..errors import DirectoryLockedError
from .objects import ObjectStore

__all__ = ["DEFAULT_LOCK_TTL", "ObjectLock"]

log = logging.getLogger("ckptwriter")

# A crashed writer's lock blocks a new writer for at most this long; a live writer
# extends it every third of it, so it survives two failed heartbeats in a row.
DEFAULT_LOCK_TTL = 60.0


class ObjectLock:
    """A lease on a checkpoints prefix, renewed by a heartbeat thread while held.

    Args:
        store: the object store holding the prefix.
        path: the lock object's store path (``<prefix>/.lock``).
        location: the prefix's URL, for messages.
        ttl: seconds after which the lock of a writer that stopped heartbeating may be
            taken over.
    """

    def __init__(self, store: ObjectStore, path: str, location: str, ttl: float) -> None:
        self.store = store
        self.path = path
        self.location = location
        self.ttl = float(ttl)
        # Set by a writer process from its training process, which keeps them across
        # restarts: a replacement process may take over the lock of the one that died.
        self.token: str | None = None
        self.owner = f"pid {os.getpid()} on {socket.gethostname()}"
        self._token = ""
        self._tag: str | None = None
        self._expires = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # The heartbeat and the pre-marker renewal must not race each other with one tag.
        self._renewing = threading.Lock()

    def acquire(self) -> None:
        """Create the lock object, or take over an expired one; start the heartbeat.

        Raises:
            DirectoryLockedError: another writer holds a live lock.
        """
        self._token = self.token or uuid.uuid4().hex
        try:
            self._tag = self._write(partial(self.store.create, self.path))
        except FileExistsError:
            self._tag = self._take_over_stale()
        self.lost = None
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name="ckptwriter-lock-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock object if it is still ours."""
        thread, self._heartbeat = self._heartbeat, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self.lost is None and self._tag is not None:
            try:
                _, tag = self.store.read_tagged(self.path)
                if tag == self._tag:
                    self.store.rm([self.path])
            except Exception as exc:
                log.warning("could not release the lock %s (it expires in %.0f s): %s",
                            self.store.url(self.path), self.ttl, exc)
        self._tag = None

    def confirm(self) -> None:
        """Renew the lock right before a commit marker: never commit over another writer.

        Raises:
            DirectoryLockedError: the lock was taken over or expired unrenewed.
        """
        self.check()
        try:
            self._renew()
        except FileExistsError:
            pass
        except Exception as exc:
            log.warning("lock renewal for %s failed: %s", self.location, exc)
        self.check()

    def check(self) -> None:
        """Raise if the lock is known to be lost (taken over, or expired unrenewed).

        Raises:
            DirectoryLockedError: the lock is lost.
        """
        if self.lost is None and time.time() >= self._expires:
            self.lost = "its heartbeat could not be renewed before it expired"
        if self.lost is not None:
            raise DirectoryLockedError(
                f"This writer lost the lock on {self.location} ({self.lost}); "
                "another writer may own the directory now. Stop this run and check which "
                "run should write there."
            )

    # -- internals -------------------------------------------------------------------

    def _body(self, expires_at: float) -> bytes:
        return json.dumps({
            "owner": self.owner,
            "token": self._token,
            "expires_at": expires_at,
            "ttl_seconds": self.ttl,
        }).encode()

    def _write(self, write: Callable[[bytes], str]) -> str:
        # The expiry is computed before the request, so others never see a later one
        # than we assume; it counts only once the write succeeded.
        expires = time.time() + self.ttl
        tag = write(self._body(expires))
        self._expires = expires
        return tag

    def _take_over_stale(self) -> str:
        try:
            data, tag = self.store.read_tagged(self.path)
        except FileNotFoundError:
            # Released between our create and our read: try once more.
            return self._write(partial(self.store.create, self.path))
        try:
            held = json.loads(data)
            owner = str(held["owner"])
            expires = float(held["expires_at"])
            mine = held.get("token") == self._token
        except (ValueError, KeyError, TypeError, AttributeError):
            owner, expires, mine = "unknown owner, unreadable lock", float("inf"), False
        left = expires - time.time()
        if left > 0 and not mine:
            when = "never" if left == float("inf") else f"in {left:.0f} s"
            lock_url = self.store.url(self.path)
            raise DirectoryLockedError(
                f"Checkpoint directory {self.location} is locked by another writer ({owner}; "
                f"the lock expires {when} unless that writer keeps it alive). Only one writer "
                "may own a checkpoints directory: stop the other run, or use another "
                f"checkpoint_dir. If no writer is running, delete {lock_url}."
            )
        log.warning("taking over the expired lock of %s (%s)", self.location, owner)
        try:
            return self._write(partial(self._replace, tag))
        except FileExistsError:
            raise DirectoryLockedError(
                f"Checkpoint directory {self.location} was just locked by another writer "
                "taking over the same expired lock: stop one of the runs."
            ) from None

    def _replace(self, tag: str, body: bytes) -> str:
        return self.store.replace_if(self.path, body, tag)

    def _renew(self) -> None:
        """Extend the lock (conditional on it being ours); FileExistsError if it is not."""
        with self._renewing:
            if self.lost is not None:
                return
            assert self._tag is not None
            try:
                self._tag = self._write(partial(self._replace, self._tag))
            except FileExistsError:
                self.lost = "another writer took over the lock"
                raise

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except FileExistsError:
                return
            except Exception as exc:
                # Transient: the expiry check in check() stops commits if it lasts.
                log.warning("lock heartbeat for %s failed: %s", self.location, exc)
