"""The writer process (child side): started by ProcessExecutor, it runs :func:`main`.

It reads frames on stdin (``wire.OpenRequest``, then one ``wire.CommitRequest`` per
checkpoint followed by that checkpoint's memory, log and state bytes, or naming where in
the parent they are) and answers each on stdout; a report that says ``preparing`` is
followed by ``wire.Ready`` once the next commit's memory prefix is copied ahead (the
parent sends nothing in between). It exits when stdin closes. Nothing but frames is ever written to
stdout.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, NoReturn, TypeVar

import msgspec

from . import memory_pull, wire
from .agent_state import StateItem
from .commit import CommitPipeline
from .memory import MemoryCapture, NeedFullMemory
from .memory_pieces import Pulled
from .memory_pull import PeerMemory
from .options import WriterOptions
from .snapshot import CapturedSnapshot
from .state_codec import EncodedValue
from .storage import RemoteStorage, open_backend
from .storage.local import LocalStorage

_T = TypeVar("_T")
_OPEN = wire.decoder(wire.OpenRequest)
_COMMIT = wire.decoder(wire.CommitRequest)


def _die_with_parent(parent: int) -> None:
    """Exit the moment the parent is gone, even in the middle of a commit.

    A `kill -9` of the training run must take its writer with it, exactly as it would a
    writer thread (and free the directory lock at once): whatever it was doing is
    cleaned up by the next writer's start. PR_SET_PDEATHSIG cannot be used: it follows
    the *thread* that started us, and trio starts processes from short-lived threads.
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)
        except (AttributeError, OSError):
            while os.getppid() == parent:
                time.sleep(0.05)
        else:
            select.select([fd], [], [])
        os._exit(0)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, name="ckptwriter-parent-watch", daemon=True).start()


def _read_exactly(inp: BinaryIO, n: int) -> bytes | None:
    data = inp.read(n)
    if data is None or len(data) < n:
        return None
    return data


def _read_frame(inp: BinaryIO, dec: msgspec.msgpack.Decoder[_T]) -> _T | None:
    head = _read_exactly(inp, wire.FRAME.size)
    if head is None:
        return None
    body = _read_exactly(inp, wire.FRAME.unpack(head)[0])
    return None if body is None else wire.decode(dec, body)


def _reply(out: BinaryIO, msg: msgspec.Struct) -> None:
    out.write(wire.encode(msg))
    out.flush()


class _Arrival:
    """How much of a memfd hand-over the parent has written so far, as the lengths that
    follow the frame on stdin say: read only when a byte beyond it is wanted."""

    def __init__(self, inp: BinaryIO, total: int) -> None:
        self._inp, self.total, self._have = inp, total, 0
        # The writing thread and the hashing thread both wait on it.
        self._lock = threading.Lock()
        self.mapped: mmap.mmap | None = None

    def wait(self, offset: int) -> None:
        """Return once every byte before ``offset`` of the hand-over is in the memfd.

        Raises:
            OSError: stdin ended first (the parent is gone).
        """
        with self._lock:
            while self._have < min(offset, self.total):
                head = _read_exactly(self._inp, wire.ARRIVED.size)
                if head is None:
                    raise OSError("the hand-over ended before its last byte arrived")
                had, self._have = self._have, wire.ARRIVED.unpack(head)[0]
                if not had < self._have <= self.total:
                    raise OSError(f"the hand-over's notes went from {had} to {self._have} "
                                  f"bytes of {self.total}: out of step with the parent")
                if self.mapped is not None and _POPULATE_READ is not None:
                    # Map the slice's pages in one call: faulting them in one by one
                    # while writing them out costs more than the copy itself.
                    start = had - had % mmap.PAGESIZE
                    with contextlib.suppress(OSError):
                        self.mapped.madvise(_POPULATE_READ, start, self._have - start)


# madvise(MADV_POPULATE_READ): Linux 5.14 on (Python names it from 3.13 on).
_POPULATE_READ: int | None = getattr(mmap, "MADV_POPULATE_READ",
                                     22 if sys.platform == "linux" else None)
# A hand-over still arriving is read in pieces of this size, each once it is there.
_PIECE_BYTES = wire.HANDOFF_SLICE_BYTES


def _capture(log_id: str, entries: int, nbytes: int, base: int, delta: memoryview,
             arrival: _Arrival | None = None, at: int = 0,
             peer: PeerMemory | None = None) -> MemoryCapture:
    if peer is not None:
        # Nothing here yet: each reader reads the bytes from the parent as it goes.
        def pulled(start: int) -> Sequence[memoryview]:
            return Pulled(peer, at + start - base, nbytes - start)

        return MemoryCapture(log_id=log_id, entries=entries, nbytes=nbytes, chunks=[],
                             chunk_ends=[], n_chunks=0, base=base, pulled=pulled)
    # Views into the payload, not copies (iter_bytes only takes memoryviews of chunks).
    if arrival is None:
        chunks: Any = [delta] if len(delta) else []
    else:
        chunks = [delta[i:i + _PIECE_BYTES] for i in range(0, len(delta), _PIECE_BYTES)]
    ends = list(itertools.accumulate(map(len, chunks), initial=base))[1:]

    def arrived(end: int) -> None:
        assert arrival is not None
        arrival.wait(at + end - base)

    return MemoryCapture(log_id=log_id, entries=entries, nbytes=nbytes, chunks=chunks,
                         chunk_ends=ends, n_chunks=len(chunks), base=base,
                         arrived=None if arrival is None else arrived)


def _snapshot(req: wire.CommitRequest, payload: bytes | mmap.mmap,
              arrival: _Arrival | None = None,
              peer: PeerMemory | None = None) -> CapturedSnapshot:
    """The snapshot a request and its payload describe: the state values that were
    sent, the memory's delta (from ``base``), then each log's, back to back (in the
    parent's memory, when ``peer`` reads it from there)."""
    view = memoryview(payload)
    at = 0
    state = {}
    for key, ref in req.state.items():
        data = b""
        if ref.sent:
            # First in the payload: waiting for them is waiting for their bytes only.
            if peer is not None:
                data = peer.read(at, ref.nbytes)
            else:
                if arrival is not None:
                    arrival.wait(at + ref.nbytes)
                data = bytes(view[at:at + ref.nbytes])
            at += ref.nbytes
        state[key] = StateItem(ref.file, ref.version, EncodedValue("bytes", data), ref.sent)
    n = req.nbytes - req.base
    memory = _capture(req.log_id, req.entries, req.nbytes, req.base, view[at:at + n],
                      arrival, at, peer)
    at += n
    logs = {}
    for name, d in req.logs.items():
        n = d.nbytes - d.base
        logs[name] = _capture(d.log_id, d.entries, d.nbytes, d.base, view[at:at + n],
                              arrival, at, peer)
        at += n
    held = len(view) if peer is None else peer.total
    if at != held:
        raise ValueError(f"commit payload holds {held} bytes, the request {at}")
    return CapturedSnapshot(req.meta, memory, 0.0, logs, state)


def _open(req: wire.OpenRequest) -> CommitPipeline:
    options = WriterOptions.from_wire(req.options)
    backend = open_backend(os.fsdecode(req.location), fsync=options.fsync,
                           storage_options=dict(options.storage_options))
    if isinstance(backend, LocalStorage):
        backend.owner = f"pid {req.owner_pid}"  # the training run, not this helper
        backend.spares = True  # SIGIO is ignored here (main)
    elif isinstance(backend, RemoteStorage):
        backend.claim_as(f"pid {req.owner_pid} on {socket.gethostname()}", req.lock_token)
    return CommitPipeline(backend, options.policy, options.protect, mode=options.mode)


def _puller(req: wire.OpenRequest) -> Callable[[list[tuple[int, int]]], PeerMemory] | None:
    """How to read the parent's memory, if its probe reads back (see ``memory_pull``):
    directly, else through the handle it passed; None: neither works here."""
    if req.mem_fd >= 0:
        # Ours alone: no process this one starts may inherit the training process's memory.
        os.set_inheritable(req.mem_fd, False)
    if not req.probe:
        return None
    check = (req.probe_address, req.probe)
    ways: list[Callable[[list[tuple[int, int]]], PeerMemory]] = []
    if req.owner_pid == os.getppid():
        ways.append(lambda r: PeerMemory(r, parent=req.owner_pid, check=check))
    if req.mem_fd >= 0:
        ways.append(lambda r: PeerMemory(r, fd=req.mem_fd))
    for way in ways:
        try:
            if way([(req.probe_address, len(req.probe))]).read(0, len(req.probe)) == req.probe:
                break
        except (OSError, ValueError):
            continue
    else:
        way = None
    if req.mem_fd >= 0 and (way is None or way is not ways[-1]):
        os.close(req.mem_fd)  # not the way taken: the handle is not kept
    return way


def serve(inp: BinaryIO, out: BinaryIO) -> int:
    """Serve one writer until stdin closes; the exit code for the process."""
    opening = _read_frame(inp, _OPEN)
    if opening is None:
        return 2
    try:
        pipeline = _open(opening)
        records = pipeline.open()
    except Exception as exc:
        _reply(out, wire.OpenReply(error=wire.WireError.of(exc)))
        return 0
    puller = _puller(opening)
    _reply(out, wire.OpenReply([(r.name, r.episode_index, r.val_score) for r in records],
                               can_pull=puller is not None))
    # Nothing arrives between a reply and its Ready but the end of stdin.
    waiting = select.poll()
    waiting.register(inp.fileno(), select.POLLIN | select.POLLHUP)
    try:
        while True:
            req = _read_frame(inp, _COMMIT)
            if req is None:
                return 0
            delta: bytes | mmap.mmap | None = _read_exactly(inp, req.payload)
            if delta is None:
                return 0
            # A large delta is read from the parent's memory, or handed over in a file
            # the parent is still filling: map it and write what has arrived (the
            # parent closes it after our reply).
            arrival = _Arrival(inp, req.delta_bytes) if req.delta_file is not None else None
            try:
                try:
                    peer = None
                    if req.pull is not None:
                        peer = (puller or (lambda r: PeerMemory(r)))(req.pull)
                    elif req.delta_file is not None:
                        with open(req.delta_file, "rb") as f:
                            delta = mmap.mmap(f.fileno(), req.delta_bytes,
                                              access=mmap.ACCESS_READ)
                        if arrival is not None:
                            arrival.mapped = delta
                    report = pipeline.persist(_snapshot(req, delta, arrival, peer))
                finally:
                    if arrival is not None:
                        # Every length the parent sends is read, whatever happened: the
                        # next frame must start where we read next.
                        arrival.wait(arrival.total)
            except NeedFullMemory:
                # The previous file cannot be extended after all (changed on disk, or
                # another log): the loop resends the whole memory.
                _reply(out, wire.CommitReply(resend_full=True))
                continue
            except Exception as exc:
                if memory_pull.is_refused(exc):
                    _reply(out, wire.CommitReply(cannot_pull=True))
                else:
                    _reply(out, wire.CommitReply(error=wire.WireError.of(exc)))
                continue
            _reply(out, wire.reply_for(report))
            if report.preparing:
                # Before the parent may send the next snapshot: the next commit then
                # only appends to this copy. Stopped at once if stdin closes (drain).
                pipeline.prepare(lambda: bool(waiting.poll(0)))
                _reply(out, wire.Ready())
    finally:
        pipeline.close()


def main() -> int:
    """Entry point of the writer process."""
    # First: a Ctrl-C, SIGTERM or hangup (SIGHUP) sent to the whole process group must not
    # kill the writer before the final checkpoint is written; the parent drains and stops
    # us. The parent started us with them blocked, so until here they wait; ignored
    # before they are unblocked, any that came meanwhile are discarded.
    group = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in group:
        signal.signal(sig, signal.SIG_IGN)
    # A lease break (storage/local_prepare.keep_spare) signals SIGIO, whose default is
    # to exit: the lease is only ever a test, but nothing may stop a commit.
    if hasattr(signal, "SIGIO"):
        signal.signal(signal.SIGIO, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, group)
    parent = os.getppid()
    _die_with_parent(parent)
    out = sys.stdout.buffer
    # Anything printed by accident must not corrupt the frames on stdout.
    sys.stdout = sys.stderr
    try:
        return serve(sys.stdin.buffer, out)
    except BrokenPipeError:
        # The parent closed its end (it was killed, or is gone): nobody to answer, and
        # nothing to report; a writer thread would have died with it without a word.
        return 0
    except Exception:
        # A bug or a broken pipe: the traceback goes to stderr, and the exit code tells
        # the parent there is one to point at.
        traceback.print_exc()
        return wire.EXIT_CRASHED


def run() -> NoReturn:
    """:func:`main`, then exit at once: no interpreter teardown on the parent's drain.

    Everything that matters is done when :func:`serve` returns: each reply was flushed,
    the directory lock released (``pipeline.close()``). Finalizing the interpreter (module
    teardown, garbage collection) would only make the parent's ``close()`` wait longer.
    """
    code = main()
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
