"""The writer process reading a large hand-over straight from the training process.

A large delta used to cross in a memfd the loop filled: the loop paid a copy of every
byte and the first touch of as much fresh shared memory (on a VM, seconds per GiB), and
the writer process read it all again. Instead the loop only names where its (immutable)
bytes are, and the writer process copies them out of the loop's memory with
``process_vm_readv`` into a few small buffers it reuses, writes and hashes each piece
while it is still in the CPU's cache, and answers when it is done. The loop's part is
a frame; its bytes stay alive, unchanged, until that answer (the loop holds them).

The parent side: :func:`addresses` of its views and :func:`allow_reader` (Yama's
``ptrace_scope = 1`` lets only an ancestor read a process unless it names its reader).
The child side: :class:`PeerMemory`. Where the call is missing or refused (not Linux,
a seccomp filter, ``ptrace_scope`` 2 or 3), the probe at open fails and the memfd
hand-over is used.
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

__all__ = ["PeerMemory", "PullRefused", "addresses", "allow_reader"]

# The pieces a hand-over is read, written and hashed in: small enough that a few of
# them stay in the CPU's last-level cache between the writer thread and the hasher.
PIECE_BYTES = 2 * 1024 * 1024
# Buffers kept in the writer process between hand-overs (a new one costs its first
# touch): the read-ahead waits for one to be let go of by the writer and the hasher.
_RING_SLOTS = 8
# Linux caps the iovecs of one process_vm_readv (IOV_MAX).
_IOV_MAX = 1024
# How long the read-ahead waits for a buffer once the reader has had every piece read so
# far (it keeps their views: a join) before it reads the next into one of its own; and
# how often it looks again (letting go of a view notifies no one).
_PATIENCE = 0.02
_POLL = 0.002
_PR_SET_PTRACER = 0x59616D61


class PullRefused(PermissionError):
    """The kernel refuses this process a read of the other one's memory (Yama's
    ``ptrace_scope``: another writer in the same training process named its own
    writer process as the only reader). The bytes are handed over another way."""


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


def _libc() -> Any | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
_READV: Any = getattr(_LIBC, "process_vm_readv", None)
if _READV is not None:
    _READV.restype = ctypes.c_ssize_t
    _READV.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                       ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_GET_BUFFER = ctypes.pythonapi.PyObject_GetBuffer
_GET_BUFFER.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_RELEASE_BUFFER = ctypes.pythonapi.PyBuffer_Release
_RELEASE_BUFFER.argtypes = [ctypes.POINTER(_PyBuffer)]


def available() -> bool:
    """Whether this platform has the call at all (a probe still decides if it works)."""
    return _READV is not None


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


def allow_reader(pid: int) -> None:
    """Let ``pid`` (our writer process) read this process where Yama would refuse it."""
    if _LIBC is not None:
        # EINVAL without Yama: nothing to allow then.
        _LIBC.prctl(_PR_SET_PTRACER, ctypes.c_ulong(pid), 0, 0, 0)


class PeerMemory:
    """Bytes of another process: ``total`` bytes, ``ranges`` (address, length) of it."""

    def __init__(self, pid: int, ranges: Sequence[tuple[int, int]]) -> None:
        self._pid = pid
        self._ranges = [(int(a), int(n)) for a, n in ranges]
        self._starts = [0]
        for _, n in self._ranges:
            self._starts.append(self._starts[-1] + n)
        self.total = self._starts[-1]

    def _remote(self, at: int, n: int) -> list[tuple[int, int]]:
        """The remote (address, length) pieces that hold bytes ``[at, at + n)``."""
        i = bisect.bisect_right(self._starts, at) - 1
        out = []
        while n > 0:
            addr, size = self._ranges[i]
            off = at - self._starts[i]
            take = min(size - off, n)
            out.append((addr + off, take))
            at, n, i = at + take, n - take, i + 1
        return out

    def read_into(self, dest: int, at: int, n: int) -> None:
        """Copy bytes ``[at, at + n)`` to the local address ``dest``.

        Raises:
            OSError: the other process is gone, or refuses us.
        """
        if at < 0 or at + n > self.total:
            raise ValueError(f"bytes {at}..{at + n} of a hand-over of {self.total}")
        remote = self._remote(at, n)
        for k in range(0, len(remote), _IOV_MAX):
            part = remote[k:k + _IOV_MAX]
            riov = (_Iovec * len(part))(*[_Iovec(a, m) for a, m in part])
            want = sum(m for _, m in part)
            local = _Iovec(dest, want)
            got = _READV(self._pid, ctypes.byref(local), 1, riov, len(part), 0)
            if got < 0:
                err = ctypes.get_errno()
                kind = PullRefused if err in (errno.EPERM, errno.EACCES) else OSError
                raise kind(err, f"reading the training process's bytes: {os.strerror(err)}")
            if got != want:
                # A partial read means a range ended early: its object is gone.
                raise OSError(f"read {got} of {want} bytes from the training process")
            dest += want

    def read(self, at: int, n: int) -> bytes:
        """A copy of bytes ``[at, at + n)``."""
        return bytes(self.fresh(at, n))

    def fresh(self, at: int, n: int) -> memoryview:
        """Bytes ``[at, at + n)`` in a buffer of their own."""
        buf = bytearray(n)
        if n:
            self.read_into(_address_of(buf), at, n)
        return memoryview(buf)

    def views(self, at: int, n: int) -> Sequence[memoryview]:
        """Bytes ``[at, at + n)`` as pieces read when they are wanted (see :class:`Pulled`)."""
        return Pulled(self, at, n)


def _address_of(buf: bytearray) -> int:
    # Taken and let go at once: the bytearray is never resized, so the address holds.
    c = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(c)
    del c
    return addr


class _Slot:
    __slots__ = ("addr", "buf", "free_refs")

    def __init__(self) -> None:
        self.buf = bytearray(PIECE_BYTES)
        self.addr = _address_of(self.buf)
        self.free_refs = sys.getrefcount(self.buf)

    def unused(self) -> bool:
        """No view of it is alive (each memoryview over it holds a reference)."""
        return sys.getrefcount(self.buf) <= self.free_refs


# Buffers kept for the next hand-over (a new one costs its first touch), and the
# condition a reader waits on for one to be let go of.
_SLOTS: list[_Slot] = []
_FREED = threading.Condition()


class Pulled(Sequence[memoryview]):
    """Bytes of a :class:`PeerMemory` in pieces, each read when it is wanted.

    Iterating reads each piece into one of a few reused buffers, and hands it to a
    hashing thread too when :meth:`hash_along` asked for it: one read, written and hashed
    while it is in the cache. A buffer is reused only when no view of it is alive, so a
    reader that keeps views (a join, an upload's retry) keeps their bytes. Indexing
    reads a piece into a buffer of its own.
    """

    def __init__(self, peer: PeerMemory, at: int, n: int) -> None:
        self._peer, self._at, self.nbytes = peer, at, n
        self._sha: Any = None
        self._hashed = 0  # bytes the hashing thread has had, in order
        self._hasher: threading.Thread | None = None

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
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None
        if self._sha is not None:
            while self._hashed < self.nbytes:
                n = min(PIECE_BYTES, self.nbytes - self._hashed)
                self._sha.update(self._peer.fresh(self._at + self._hashed, n))
                self._hashed += n
            self._sha = None

    def abandon_hash(self) -> None:
        """Stop feeding the hash (the write failed: no digest is wanted)."""
        self._sha = None
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None

    def __iter__(self) -> Iterator[memoryview]:
        feed: queue.SimpleQueue[memoryview | None] | None = None
        if self._sha is not None and self._hasher is None and not self._hashed:
            feed = queue.SimpleQueue()
            self._hasher = threading.Thread(target=self._hash, args=(self._sha, feed),
                                            name="ckptwriter-hash-pulled", daemon=True)
            self._hasher.start()
        # A thread reads the pieces ahead, into the buffers this reader and the hasher
        # let go of, so that reading overlaps writing (which waits on the disk).
        ready: queue.SimpleQueue[memoryview | BaseException] = queue.SimpleQueue()
        stop = threading.Event()
        reader = threading.Thread(target=self._read_ahead, args=(ready, stop),
                                  name="ckptwriter-read-ahead", daemon=True)
        reader.start()
        try:
            for _ in range(len(self)):
                view = ready.get()
                if isinstance(view, BaseException):
                    raise view
                if feed is not None:
                    feed.put(view)
                yield view
                del view
        finally:
            stop.set()
            with _FREED:
                _FREED.notify_all()
            # No read of the parent's memory may outlive the iteration.
            reader.join()
            if feed is not None:
                feed.put(None)

    def _read_ahead(self, ready: queue.SimpleQueue[memoryview | BaseException],
                    stop: threading.Event) -> None:
        try:
            for k in range(len(self)):
                view = self._read(*self._span(k), stop, ready.empty)
                if view is None:
                    return
                ready.put(view)
                del view
        except BaseException as exc:  # handed to the reader, raised there
            ready.put(exc)

    def _hash(self, sha: Any, feed: queue.SimpleQueue[memoryview | None]) -> None:
        while (view := feed.get()) is not None:
            if self._sha is not None:  # not abandoned
                sha.update(view)
                self._hashed += len(view)
            del view
            with _FREED:
                _FREED.notify_all()

    def _read(self, at: int, n: int, stop: threading.Event,
              starved: Callable[[], bool]) -> memoryview | None:
        """Bytes ``[at, at + n)`` in a buffer no one else uses now (None: stopped)."""
        since = time.monotonic()
        with _FREED:
            while True:
                if stop.is_set():
                    return None
                slot = next((s for s in _SLOTS if s.unused()), None)
                if slot is None and len(_SLOTS) < _RING_SLOTS:
                    slot = _Slot()
                    _SLOTS.append(slot)
                if slot is not None:
                    # Ours from here: a view of it exists before the lock is let go.
                    view = memoryview(slot.buf)[:n]
                    break
                # Every buffer is being written or hashed: one is let go of soon (a
                # view dropped by its writer notifies no one: look again soon). If the
                # reader has had every piece read so far and still holds every buffer
                # (it keeps views: a join), this piece gets a buffer of its own.
                if starved() and time.monotonic() - since >= _PATIENCE:
                    return self._peer.fresh(at, n)
                _FREED.wait(_POLL)
        self._peer.read_into(slot.addr, at, n)
        return view
