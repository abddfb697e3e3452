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
side: :class:`PeerMemory`, read in pieces by ``memory_pieces.Pulled``. CPython only
(``ctypes.pythonapi``; the pieces' buffers are known free by ``sys.getrefcount``).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import sys
from collections.abc import Sequence
from typing import Any

from .storage.posix_io import libc_function

__all__ = ["OwnMemory", "PeerMemory", "PullRefused", "addresses", "is_refused",
           "open_own_memory", "supported"]

# The pieces a hand-over is read, written and hashed in: small enough that a few of
# them stay in the CPU's last-level cache between the writer thread and the hasher.
PIECE_BYTES = 2 * 1024 * 1024


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
    fn = libc_function("process_vm_readv", [
        ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
        ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong])
    if fn is not None:
        fn.restype = ctypes.c_ssize_t
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

    def fresh(self, at: int, n: int, *, aligned: bool = False) -> memoryview:
        """Bytes ``[at, at + n)`` in a buffer of their own; ``aligned``: page-aligned
        (mapped), for a piece a direct write may take."""
        buf: bytearray | mmap.mmap = \
            mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE) if aligned and n else bytearray(n)
        if n:
            self.read_into(memoryview(buf), at)
        return memoryview(buf)


class OwnMemory(PeerMemory):
    """The bytes of ``views``, in this process (kept alive here), read as a
    :class:`PeerMemory` is: a thread executor's large full write goes through the same
    page-aligned pieces as the writer process's. Copied by ``ctypes.memmove``, which
    releases the GIL (a training loop keeps running beside the copy)."""

    def __init__(self, views: Sequence[memoryview | bytes]) -> None:
        self._views = list(views)
        super().__init__(addresses(self._views))

    def read_into(self, dest: memoryview, at: int) -> None:
        n = len(dest)
        if at < 0 or at + n > self.total:
            raise ValueError(f"bytes {at}..{at + n} of a hand-over of {self.total}")
        if not n:
            return
        out = addresses([dest])[0][0]
        for addr, size in self._segments(at, n):
            ctypes.memmove(out, addr, size)
            out += size


def is_refused(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it wraps) says the memory cannot be read there."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PullRefused):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False

