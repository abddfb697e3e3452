"""The single-writer lock of a checkpoints prefix on object storage, and its fence.

A ``.lock`` object holds the owner, a per-writer token and an expiry that a heartbeat
thread extends. On S3 it is created with ``If-None-Match: *`` and extended with
``If-Match: <etag>``, so two writers cannot both hold it. Stores without conditional
writes get a check-then-write, atomic only within one process (see
docs/OBJECT_STORAGE.md for the limits).

Lease timing: the holder decides when its own lease ends with ``time.monotonic()``
(a wall-clock step, an NTP jump, never ends or extends it): a lease counts from the
moment its renewal request was *sent*, for ``ttl`` minus a skew margin. The
``expires_at`` written for other writers is wall-clock (hosts share no other clock);
the margin covers that much skew between hosts, and the fence covers the rest.

Renewal is idempotent: a renewal whose PUT was applied but whose reply was lost is
retried by the client with the old ETag and gets 412; the lock is then read back, and a
body carrying this writer's own token is adopted (its ETag becomes ours). Only a foreign
token, or a lock object that vanished, means another writer took over.

A successful conditional renewal proves that nobody wrote the lock since our last
write, so a lease that expired locally (the store unreachable for a while) is valid
again once a renewal gets through; a takeover is final.

The fence (:meth:`ObjectLock.check`, :meth:`ObjectLock.verify`, :meth:`ObjectLock.confirm`)
is what every mutating write of the writer calls first; see ``remote.py`` for where.

Error handling:
    :meth:`ObjectLock.acquire` raises :class:`DirectoryLockedError` when another writer
    holds a live lock; store failures pass through for the caller to wrap.
    :meth:`ObjectLock.check`, :meth:`ObjectLock.verify` and :meth:`ObjectLock.confirm`
    raise :class:`DirectoryLockedError` once the lock is lost or the lease expired.
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

from ..errors import DirectoryLockedError, StorageError
from .objects import ObjectStore

__all__ = ["DEFAULT_LOCK_TTL", "ObjectLock"]

log = logging.getLogger("ckptwriter")

# A crashed writer's lock blocks a new writer for at most this long; a live writer
# extends it every third of it, so it survives two failed heartbeats in a row.
DEFAULT_LOCK_TTL = 60.0
# The holder's own lease ends this fraction of the TTL before the expiry other writers
# read: 10 s of wall-clock skew between hosts at the default TTL.
_SKEW_FRACTION = 1 / 6
# A renewal whose reply is lost twice in a row is left to the next heartbeat.
_RENEW_ATTEMPTS = 3


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
        # time.monotonic() at which this writer's lease ends (never the wall clock).
        self._deadline = 0.0
        # time.monotonic() at which the store last confirmed the lock is ours.
        self._proven = float("-inf")
        # Why the lock is lost for good (taken over or deleted); None while held.
        self.lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # The heartbeat, the pre-marker renewal and verify() must not race on one tag.
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
            DirectoryLockedError: the lock was taken over or the lease expired unrenewed.
        """
        self.check()
        try:
            self._renew()
        except DirectoryLockedError:
            raise
        except Exception as exc:
            # Transient: the lease may still be valid, which check() decides.
            log.warning("lock renewal for %s failed: %s", self.location, exc)
        self.check()

    def verify(self, max_age: float = 0.0) -> None:
        """Check with the store that the lock is still ours (one HEAD), then check().

        Args:
            max_age: skip the request if the store confirmed the lock this recently
                (seconds): another writer can take it over only once it looks expired.

        Raises:
            DirectoryLockedError: the lock was taken over or the lease expired.
            OSError: the store could not be asked (the caller wraps it).
        """
        self.check()
        if time.monotonic() - self._proven > max_age:
            with self._renewing:
                self._raise_if_lost()
                asked = time.monotonic()
                if self.store.tag(self.path) != self._tag:
                    self._adopt()
                self._proven = asked
        self.check()

    def put(self, path: str, data: bytes, tag: str | None, *, retake: bool = False) -> str:
        """Write an object over its version ``tag`` only (None: only if absent); its new tag.

        A conflict whose object already holds ``data`` is a retried PUT whose first
        attempt landed. Another version is checked against the lock (:meth:`verify`):
        with ``retake`` the holder writes over it once, else it is an error.

        Raises:
            DirectoryLockedError: the lock was lost.
            StorageError: someone else changed the object.
            OSError: the store failed (the caller wraps it).
        """
        for _ in range(2):
            try:
                if tag is None:
                    return self.store.create(path, data)
                return self.store.replace_if(path, data, tag)
            except FileExistsError:
                try:
                    current: bytes | None
                    current, now = self.store.read_tagged(path)
                except FileNotFoundError:
                    current, now = None, None
                if current == data and now is not None:
                    return now
                self.verify()
                if not retake:
                    break
                log.warning("%s was changed by another program; this writer holds the "
                            "lock and writes over it", self.store.url(path))
                tag = now
        raise StorageError(
            f"{self.store.url(path)} was changed by someone else while this writer, which "
            f"holds the lock, was writing it: make sure only this run writes under "
            f"{self.location}."
        )

    def check(self) -> None:
        """Raise if the lock is lost or this writer's lease has expired (no request).

        Raises:
            DirectoryLockedError: the lock is lost or the lease expired.
        """
        self._raise_if_lost()
        late = time.monotonic() - self._deadline
        if late >= 0:
            raise DirectoryLockedError(
                f"This writer lost the lock on {self.location}: its lease expired "
                f"{late:.0f} s ago (the lock could not be renewed in time), so another "
                "writer may take the directory over. Nothing more is written until a "
                "renewal gets through; check the network and the store."
            )

    # -- internals -------------------------------------------------------------------

    def _raise_if_lost(self) -> None:
        if self.lost is not None:
            raise DirectoryLockedError(
                f"This writer lost the lock on {self.location} {self.lost}; nothing more "
                "is written there. Stop this run and check which run should write there."
            )

    def _lose(self, why: str) -> None:
        self.lost = why
        self._raise_if_lost()

    def _body(self, expires_at: float) -> bytes:
        return json.dumps({
            "owner": self.owner,
            "token": self._token,
            "expires_at": expires_at,
            "ttl_seconds": self.ttl,
        }).encode()

    def _write(self, write: Callable[[bytes], str]) -> str:
        # The lease counts from before the request, so it never ends later than the
        # expiry others read; it counts only once the write succeeded.
        sent = time.monotonic()
        tag = write(self._body(time.time() + self.ttl))
        self._deadline = sent + self.ttl * (1 - _SKEW_FRACTION)
        self._proven = sent
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
        # Wall clock: the expiry was written by another host.
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

    def _adopt(self) -> None:
        """The lock changed under our tag: ours if it carries our token, else lost."""
        try:
            data, tag = self.store.read_tagged(self.path)
        except FileNotFoundError:
            self._lose("(its lock object was deleted, by another writer or by hand)")
        try:
            held = json.loads(data)
            token, owner = held.get("token"), str(held.get("owner"))
        except (ValueError, TypeError, AttributeError):
            token, owner = None, "an unreadable lock"
        if token != self._token:
            self._lose(f"to {owner}, which took it over")
        # One of our own writes landed although its reply was lost.
        self._tag = tag

    def _renew(self) -> None:
        """Extend the lock, conditional on it being ours; DirectoryLockedError if not."""
        with self._renewing:
            self._raise_if_lost()
            for _ in range(_RENEW_ATTEMPTS):
                assert self._tag is not None
                try:
                    self._tag = self._write(partial(self._replace, self._tag))
                    return
                except FileExistsError:
                    self._adopt()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except DirectoryLockedError as exc:
                log.warning("%s", exc)
                return
            except Exception as exc:
                # Transient: check() stops commits if it outlasts the lease.
                log.warning("lock heartbeat for %s failed: %s", self.location, exc)
