"""The writer process reading a large hand-over straight from the training process.

A large delta used to cross in a memfd the loop filled: the loop paid a copy of every
byte and the first touch of as much fresh shared memory (on a VM, seconds per GiB), and
the writer process read it all again. Instead the loop only names where its (immutable)
bytes are, and the writer process reads them out of the loop's memory into a few small
buffers it reuses, ahead of the write, writes each piece and hashes it from the same
buffer, and answers when it is done. The loop's part is a frame; its bytes stay alive,
unchanged, until that answer (the loop holds them).

The writer process reads with ``process_vm_readv`` where the kernel lets it read its
parent (Yama off or ``ptrace_scope = 0``, same user): the fastest, one copy. It checks
after each read that its parent is still the training process (a child is re-parented
before its parent's pid can be reused), so it never reads another process. Elsewhere
(Yama's default on Ubuntu) it reads through ``/proc/self/mem``, opened by the training
process itself and handed over at start: a process may always open its own, so no
ptrace permission is asked for (this never calls ``PR_SET_PTRACER``), and the handle
stays tied to that process (a fork, a reused pid) and reads nothing once it has exited;
the kernel copies through a bounce page, which costs more CPU than the direct read.
Where neither works (not Linux, a sandbox: the probe at open tells), the memfd
hand-over is used.

The parent side: :func:`open_own_memory` and :func:`addresses` of its views. The child
side: :class:`PeerMemory`. CPython only: a buffer is known to be free when no view of it
holds a reference (``sys.getrefcount``).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, overload

__all__ = ["PeerMemory", "PullRefused", "addresses", "is_refused", "open_own_memory",
           "supported"]

# The pieces a hand-over is read, written and hashed in: small enough that a few of
# them stay in the CPU's last-level cache between the writer thread and the hasher.
PIECE_BYTES = 2 * 1024 * 1024
# Buffers kept in the writer process between hand-overs (24 MiB; a new one costs its
# first touch): the read-ahead waits for one to be let go of by the writer and hasher.
# Room for a writer's batch (8 MiB), the pieces waiting for the hasher and the one it
# hashes, and the one being read.
_RING_SLOTS = 12
# Pieces that may wait for the hasher: the writer waits for it beyond, so a hasher
# slower than the disk paces the write instead of holding ever more buffers.
_HASH_BACKLOG = 3
# How long the read-ahead waits for a buffer once the reader has had every piece read
# so far (it keeps their views: a join, an upload) before it reads the next into one of
# its own, and from then on for that reader it does not wait; and how often it looks
# again (letting go of a view notifies no one).
_PATIENCE = 0.02
_POLL = 0.002


class PullRefused(PermissionError):
    """The training process's memory could not be read where it was named (a sandbox,
    a security module): its bytes are handed over another way."""


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


_GET_BUFFER = ctypes.pythonapi.PyObject_GetBuffer
_GET_BUFFER.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_RELEASE_BUFFER = ctypes.pythonapi.PyBuffer_Release
_RELEASE_BUFFER.argtypes = [ctypes.POINTER(_PyBuffer)]


def supported() -> bool:
    """Whether a writer process may read this one's memory here at all (Linux, CPython);
    the probe at its open still decides whether it can."""
    return sys.platform == "linux" and sys.implementation.name == "cpython"


def open_own_memory() -> int | None:
    """A read-only handle on this process's memory, or None where there is none."""
    if not supported():
        return None
    try:
        return os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _process_vm_readv() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
    return fn


_READV = _process_vm_readv() if sys.platform == "linux" else None
# Linux caps the iovecs of one process_vm_readv (IOV_MAX).
_IOV_MAX = 1024


def addresses(views: Sequence[memoryview | bytes]) -> list[tuple[int, int]]:
    """Where each non-empty view's bytes are in this process, merged where adjacent.

    Valid while the views' objects live unchanged: the caller holds them.
    """
    out: list[tuple[int, int]] = []
    for v in views:
        if not len(v):
            continue
        pb = _PyBuffer()
        # PyBUF_SIMPLE: a contiguous buffer, or an error (never a strided one).
        _GET_BUFFER(v, ctypes.byref(pb), 0)
        try:
            addr, n = int(pb.buf or 0), int(pb.len)
        finally:
            _RELEASE_BUFFER(ctypes.byref(pb))
        if out and out[-1][0] + out[-1][1] == addr:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((addr, n))
    return out


def _gone() -> OSError:
    return OSError("the training process exited while its bytes were read")


class PeerMemory:
    """``total`` bytes of the parent process at ``ranges`` (address, length), read
    directly when ``parent`` is its pid, else through ``fd`` (its ``/proc/self/mem``)."""

    def __init__(self, ranges: Sequence[tuple[int, int]], *, fd: int = -1,
                 parent: int = 0, check: tuple[int, bytes] | None = None) -> None:
        self._fd, self._parent, self._check = fd, parent, check
        self._ranges = [(int(a), int(n)) for a, n in ranges]
        self._starts = [0]
        for _, n in self._ranges:
            self._starts.append(self._starts[-1] + n)
        self.total = self._starts[-1]

    def _segments(self, at: int, n: int) -> list[tuple[int, int]]:
        """(address, length) in the other process of bytes ``[at, at + n)``."""
        i = bisect.bisect_right(self._starts, at) - 1
        out = []
        while n > 0:
            addr, size = self._ranges[i]
            off = at - self._starts[i]
            take = min(size - off, n)
            out.append((addr + off, take))
            at, n, i = at + take, n - take, i + 1
        return out

    def read_into(self, dest: memoryview, at: int) -> None:
        """Fill ``dest`` with bytes ``[at, at + len(dest))``.

        Raises:
            PullRefused: the memory cannot be read there (the hand-over goes another way).
            OSError: the other process is gone (nothing more can be read from it).
        """
        n = len(dest)
        if at < 0 or at + n > self.total:
            raise ValueError(f"bytes {at}..{at + n} of a hand-over of {self.total}")
        segments = self._segments(at, n)
        if self._parent and _READV is not None:
            for k in range(0, len(segments), _IOV_MAX - 1):
                some = segments[k:k + _IOV_MAX - 1]
                size = sum(m for _, m in some)
                self._read_direct(dest[:size], some)
                dest = dest[size:]
            return
        for addr, size in segments:
            part = dest[:size]
            while len(part):
                try:
                    got = os.preadv(self._fd, [part], addr)
                except OSError as exc:
                    raise PullRefused(exc.errno, "reading the training process's bytes: "
                                      f"{exc.strerror}") from exc
                if got <= 0:
                    # Its memory is gone with it: a read returns nothing, never others'.
                    raise _gone()
                part, addr = part[got:], addr + got
            dest = dest[size:]

    def _read_direct(self, dest: memoryview, segments: list[tuple[int, int]]) -> None:
        """One ``process_vm_readv`` of ``segments`` into ``dest``, and of the probe's
        bytes beside them: still the probe's, so still the training process's memory
        (not a process that took its pid, nor a program it exec'd)."""
        assert _READV is not None
        check_at, want = self._check if self._check is not None else (0, b"")
        seen = bytearray(len(want))
        remote = (_Iovec * (len(segments) + 1))(
            *[_Iovec(a, m) for a, m in segments], _Iovec(check_at, len(want)))
        local = (_Iovec * 2)(_Iovec(addresses([dest])[0][0], len(dest)),
                             _Iovec(addresses([memoryview(seen)])[0][0] if want else 0,
                                    len(want)))
        total = len(dest) + len(want)
        got = int(_READV(self._parent, local, 2, remote, len(segments) + (1 if want else 0),
                         0))
        err = ctypes.get_errno() if got < 0 else 0
        if os.getppid() != self._parent or err == errno.ESRCH:
            raise _gone()  # re-parented: it exited (its pid may be another's by now)
        if err:
            raise PullRefused(err, f"reading the training process's bytes: {os.strerror(err)}")
        if got != total or seen != want:
            # A range that ended early, or other bytes where the probe was: not the
            # memory the frame named (an exec); nothing of it is used.
            raise _gone()

    def read(self, at: int, n: int) -> bytes:
        """A copy of bytes ``[at, at + n)``."""
        return bytes(self.fresh(at, n))

    def fresh(self, at: int, n: int) -> memoryview:
        """Bytes ``[at, at + n)`` in a buffer of their own."""
        buf = bytearray(n)
        if n:
            self.read_into(memoryview(buf), at)
        return memoryview(buf)

    def views(self, at: int, n: int) -> Pulled:
        """Bytes ``[at, at + n)`` as pieces read when they are wanted (see :class:`Pulled`)."""
        return Pulled(self, at, n)


class _Slot:
    __slots__ = ("buf", "free_refs")

    def __init__(self) -> None:
        self.buf = bytearray(PIECE_BYTES)
        self.free_refs = sys.getrefcount(self.buf)

    def unused(self) -> bool:
        """No view of it is alive (each memoryview over it holds a reference)."""
        return sys.getrefcount(self.buf) <= self.free_refs


# Buffers kept for the next hand-over, and the condition a read-ahead waits on for one
# to be let go of.
_SLOTS: list[_Slot] = []
_FREED = threading.Condition()


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
            return self._peer.fresh(at, n)
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


def is_refused(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) says the memory cannot be read there."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PullRefused):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False

