"""A large hand-over in pieces: read ahead from the training process, written, hashed.

The writer process's side of ``memory_pull``: :class:`Pulled` hands the bytes a
:class:`~ckptwriter.memory_pull.PeerMemory` names to the write as pieces, each read
once, ahead of the write, into a few reused page-aligned buffers, and hashed from the
same buffer. A thread executor's large full write goes the same way, from the loop's
own bytes (:func:`staged_for_direct_write`): then the buffers live in the training
process.
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, overload

from .memory_pull import PIECE_BYTES, OwnMemory, PeerMemory
from .storage.posix_io import DIRECT_MIN_BYTES

__all__ = ["Pulled", "staged_for_direct_write"]

# Buffers kept between hand-overs (32 MiB; a new one costs its first touch): the
# read-ahead waits for one to be let go of by the writer and hasher.
# Room for a writer's batch (8 MiB), the pieces waiting for the hasher and the one it
# hashes, and the one being read.
_RING_SLOTS = 16
# Pieces that may wait for the hasher: the writer waits for it beyond, so a hasher
# slower than the disk paces the write instead of holding ever more buffers. The two
# run at about the same speed (a direct write of 1 GiB in 0.45 to 0.55 s, its sha256
# in 0.6): room for 6 took the writer's waits for the hasher from 0.04-0.22 s to
# 0.01-0.13 s per GiB.
_HASH_BACKLOG = 6
# How long the read-ahead waits for a buffer once the reader has had every piece read
# so far (it keeps their views: a join, an upload) before it reads the next into one of
# its own, and from then on for that reader it does not wait; and how often it looks
# again (letting go of a view notifies no one).
_PATIENCE = 0.02
_POLL = 0.002


class _Slot:
    __slots__ = ("buf", "free_refs")

    def __init__(self) -> None:
        # Mapped, so page-aligned: a large full write goes from it to the disk directly.
        self.buf = mmap.mmap(-1, PIECE_BYTES, flags=mmap.MAP_PRIVATE)
        self.free_refs = sys.getrefcount(self.buf)

    def unused(self) -> bool:
        """No view of it is alive (each memoryview over it holds a reference)."""
        return sys.getrefcount(self.buf) <= self.free_refs


# Buffers kept for the next hand-over, and the condition a read-ahead waits on for one
# to be let go of.
_SLOTS: list[_Slot] = []
_FREED = threading.Condition()


def _reset_in_forked_child() -> None:
    # A fork may be made while a read-ahead holds the condition's lock (the thread
    # executor reads in the training process): the fork's own reads start afresh, on
    # buffers of their own, never on the parent's.
    global _FREED
    _FREED = threading.Condition()
    _SLOTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_forked_child)


class _Pass:
    """One iteration's read-ahead: its queue, its stop, whether it went without waiting."""

    def __init__(self) -> None:
        self.ready: queue.SimpleQueue[memoryview | BaseException] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.starved = False


class Pulled(Sequence[memoryview]):
    """Bytes of a :class:`PeerMemory` in pieces, each read when it is wanted.

    Iterating reads the pieces ahead, in a thread, into a few reused buffers, and hands
    each to a hashing thread too when :meth:`hash_along` asked for it: one read, written
    and hashed while it is in the cache. A buffer is reused only when no view of it is
    alive, so a reader that keeps views (a join, an upload's retry) keeps their bytes.
    Indexing reads a piece into a buffer of its own.
    """

    # Its pieces are whole pages in page-aligned buffers, all but the last: a large
    # full write may bypass the page cache.
    page_aligned = True

    def __init__(self, peer: PeerMemory, at: int, n: int) -> None:
        self._peer, self._at, self.nbytes = peer, at, n
        self._sha: Any = None
        self._hashed = 0  # bytes the hashing thread has had, in order
        self._hasher: threading.Thread | None = None
        self._feed: queue.Queue[memoryview | None] | None = None

    def __len__(self) -> int:
        return -(-self.nbytes // PIECE_BYTES)

    def _span(self, k: int) -> tuple[int, int]:
        start = k * PIECE_BYTES
        return self._at + start, min(PIECE_BYTES, self.nbytes - start)

    @overload
    def __getitem__(self, i: int) -> memoryview: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[memoryview]: ...
    def __getitem__(self, i: int | slice) -> memoryview | Sequence[memoryview]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = i + len(self) if i < 0 else i
        if not 0 <= k < len(self):
            raise IndexError(i)
        return self._peer.fresh(*self._span(k))

    def hash_along(self, sha: Any) -> None:
        """Let the next iteration feed ``sha`` each piece it reads, in a thread."""
        self._sha = sha

    def finish_hash(self) -> None:
        """Wait for the hashing; hash what no iteration read (an abandoned one's rest)."""
        self._end_hasher()
        if self._sha is not None:
            while self._hashed < self.nbytes:
                n = min(PIECE_BYTES, self.nbytes - self._hashed)
                self._sha.update(self._peer.fresh(self._at + self._hashed, n))
                self._hashed += n
            self._sha = None

    def abandon_hash(self) -> None:
        """Stop feeding the hash (the write failed: no digest is wanted)."""
        self._sha = None
        self._end_hasher()

    def _end_hasher(self) -> None:
        # The iteration's end sends the hasher its stop; an iterator still held
        # somewhere (never finished, never collected) must not keep it waiting.
        if self._feed is not None:
            _stop_hasher(self._feed, self._hasher)
            self._feed = None
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None

    def __iter__(self) -> Iterator[memoryview]:
        feed = None
        if self._sha is not None and self._hasher is None and not self._hashed:
            feed = self._feed = queue.Queue(_HASH_BACKLOG)
            self._hasher = threading.Thread(target=self._hash, args=(self._sha, feed),
                                            name="ckptwriter-hash-pulled", daemon=True)
            self._hasher.start()
        # A thread reads the pieces ahead, into the buffers this reader and the hasher
        # let go of, so that reading overlaps writing (which waits on the disk).
        run = _Pass()
        reader = threading.Thread(target=self._read_ahead, args=(run,),
                                  name="ckptwriter-read-ahead", daemon=True)
        reader.start()
        try:
            for _ in range(len(self)):
                view = run.ready.get()
                if isinstance(view, BaseException):
                    raise view
                if feed is not None:
                    feed.put(view)
                yield view
                del view
        finally:
            if feed is not None:
                _stop_hasher(feed, self._hasher)
            run.stop.set()
            with _FREED:
                _FREED.notify_all()
            # No read of the parent's memory outlives the iteration (unless this runs
            # on the reader itself: a collection there, nothing to wait for).
            if threading.current_thread() is not reader:
                reader.join()

    def _hash(self, sha: Any, feed: queue.Queue[memoryview | None]) -> None:
        while (view := feed.get()) is not None:
            if self._sha is not None:  # not abandoned
                sha.update(view)
                self._hashed += len(view)
            del view
            with _FREED:
                _FREED.notify_all()

    def _read_ahead(self, run: _Pass) -> None:
        try:
            for k in range(len(self)):
                view = self._read(*self._span(k), run)
                if view is None:
                    return
                run.ready.put(view)
                del view
        except BaseException as exc:  # handed to the reader, raised there
            run.ready.put(exc)

    def _read(self, at: int, n: int, run: _Pass) -> memoryview | None:
        """Bytes ``[at, at + n)`` in a buffer no one else uses now (None: stopped)."""
        since = time.monotonic()
        with _FREED:
            while True:
                if run.stop.is_set():
                    return None
                slot = next((s for s in _SLOTS if s.unused()), None)
                if slot is None and len(_SLOTS) < _RING_SLOTS:
                    slot = _Slot()
                    _SLOTS.append(slot)
                if slot is not None:
                    # Ours from here: a view of it exists before the lock is let go.
                    view = memoryview(slot.buf)[:n]
                    break
                # Every buffer is being written or hashed: one is let go of soon. If the
                # reader has had every piece read so far and still holds every buffer,
                # it keeps views: this piece gets a buffer of its own.
                if run.ready.empty() and (
                        run.starved or time.monotonic() - since >= _PATIENCE):
                    run.starved = True
                    break
                _FREED.wait(_POLL)
        if slot is None:
            return self._peer.fresh(at, n, aligned=True)
        self._peer.read_into(view, at)
        return view


def _stop_hasher(feed: queue.Queue[memoryview | None],
                 hasher: threading.Thread | None) -> None:
    """Send the hasher its stop; it takes each piece in turn, so the queue has room soon
    while it lives (a hasher that is gone needs no stop)."""
    while hasher is not None and hasher.is_alive():
        try:
            feed.put(None, timeout=_POLL)
            return
        except queue.Full:
            continue


def staged_for_direct_write(views: Sequence[memoryview], nbytes: int
                            ) -> Sequence[memoryview]:
    """A thread executor's full write of ``views`` (``nbytes``): large enough to go past
    the page cache (``posix_io.write_uncached``), it is read a piece at a time into
    page-aligned buffers, ahead of the write, and hashed from them; smaller, as it is."""
    if nbytes < DIRECT_MIN_BYTES:
        return views
    return Pulled(OwnMemory(views), 0, nbytes)
