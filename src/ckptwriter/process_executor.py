"""The parent side of the writer process: start it, feed it deltas, read its replies.

The writer process (``writer_process.py``) runs the commit pipeline in a child
interpreter with its own GIL, on another core. The loop sends one small frame per
checkpoint and only the memory bytes appended since the child's last commit; the child
copies the rest from its previous file, ahead: after each commit it says when that copy
is done (``wire.Ready``), and the next snapshot is sent only then. Nothing is pickled:
the bytes were encoded once, when the entries were appended.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import uuid
import weakref
from typing import TypeVar

import anyio
import anyio.lowlevel
import msgspec

from . import memory_pull, wire
from .commit import CommitReport
from .errors import StorageError
from .options import WriterOptions
from .pipe_send import send_in_pieces
from .retention import CheckpointRecord
from .snapshot import CapturedSnapshot
from .storage.posix_io import write_all
from .writer_child import Child, describe_exit, spawn

__all__ = ["ProcessExecutor"]

_T = TypeVar("_T")

log = logging.getLogger("ckptwriter")

# The pipe to the writer process is enlarged to this (Linux lets any user go to 1 MiB),
# so that a typical checkpoint fits in it and the loop writes it without ever blocking.
_PIPE_BYTES = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# A delta that does not fit the pipe is read by the writer process from our memory (see
# ``memory_pull``): the loop only sends where it is. Where that cannot be, it goes in
# memory shared through a file (a memfd: RAM, never written back to disk), and the child
# maps it and writes each slice as it lands. The loop copies it in itself, a slice per
# iteration: a memcpy never blocks, and a worker thread would need the GIL, which a
# CPU-bound loop can starve it of for seconds.
_HANDOFF_SLICE_BYTES = wire.HANDOFF_SLICE_BYTES
# Room for the frame in the pipe beside the delta.
_HEADER_ROOM = 64 * 1024
# How long a closing writer process may take to finish before it is killed.
_CLOSE_TIMEOUT = 30.0

_OPEN_REPLY = wire.decoder(wire.OpenReply)
_COMMIT_REPLY = wire.decoder(wire.CommitReply)
_READY = wire.decoder(wire.Ready)
# What a dead or dying child looks like from this side of the pipe.
_PIPE_ERRORS = (OSError, anyio.EndOfStream, anyio.IncompleteRead,
                anyio.ClosedResourceError, anyio.BrokenResourceError)
# Every executor with a live writer process, for the fork handler below.
_LIVE: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()
# In a forked child: the parent's writer processes, kept referenced so that collecting
# them never warns about (or tries to reap) a process that is not this one's child.
_INHERITED: list[Child] = []


def _forget_in_forked_child() -> None:
    # A child forked by the training process (a worker, multiprocessing's fork) inherits
    # our end of the writer's stdin: while it lives, closing the writer would never reach
    # EOF and would wait for the kill fallback. The copy in the fork is not ours to use.
    for executor in list(_LIVE):
        executor._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_forked_child)


def _new_delta_fd() -> int:
    """An empty fd for a large delta: a memfd, or an unlinked temp file."""
    try:
        return os.memfd_create("ckptwriter-delta", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        # No memfd (not Linux): an unlinked temp file; it vanishes with the last fd.
        fd, path = tempfile.mkstemp(prefix="ckptwriter-delta-")
        os.unlink(path)
        return fd


class ProcessExecutor:
    """A long-lived writer process, started by :meth:`open`, stopped by :meth:`aclose`.

    The process dies with its parent, is immune to SIGINT/SIGTERM/SIGHUP from its first
    instruction on (the parent decides when to stop and drains first) and exits when its
    stdin closes. If it dies unexpectedly, the checkpoint in flight fails and the next one
    starts a new one. A child forked by the training process drops its copy of the pipes,
    so it never holds the writer process open.
    """

    kind = "process"

    def __init__(self, location: str, options: WriterOptions) -> None:
        # The open message's parts; its pid and probe are taken at each start, in the
        # process that starts the writer process (a fork of the one that made us).
        self._location, self._wire_options = os.fsencode(location), options.to_wire()
        # Kept across writer-process restarts (object-storage lock).
        self._lock_token = uuid.uuid4().hex
        self._probe = b""
        self._can_pull = False
        # The bytes a writer process is reading from our memory: alive until it answered
        # or exited, whatever happens to the call that lent them.
        self._lent: list[memoryview] | None = None
        self._shown = location
        self._proc: Child | None = None
        self._wfd: int | None = None
        self._forked = False
        self._pipe_bytes = 65536
        # (log_id, nbytes) of the memory file the process committed last: deltas start there.
        self._base: tuple[str, int] | None = None
        self._known: dict[str, CheckpointRecord] = {}
        # What the process holds of the logs (name -> (log_id, nbytes)) and of the state
        # (key -> version), as its last report said; valid for that process only.
        self._hints_for: Child | None = None
        self._log_bases: dict[str, tuple[str, int]] = {}
        self._state_kept: dict[str, str] = {}
        # A commit's report was read and its Ready not yet: nothing may be sent before it.
        self._owes_ready = False

    async def open(self) -> list[CheckpointRecord]:
        reply = await self._start()
        return [CheckpointRecord(n, e, s) for n, e, s in reply.records]

    def checkpoints(self) -> list[CheckpointRecord]:
        return sorted(self._known.values(), key=lambda r: r.episode_index)

    async def _start(self) -> wire.OpenReply:
        if self._forked:
            raise StorageError(
                "this CheckpointWriter belongs to the process that forked this one; a "
                "forked child cannot write through it: open a new CheckpointWriter here"
            )
        # Our own pipes for the child's stdin and stdout: a blocking fd the loop writes
        # small frames to directly (a large delta is read from our memory by the child,
        # or goes through a memfd), and a non-blocking one its replies are awaited on.
        rfd, wfd = os.pipe()
        out_r, out_w = os.pipe()
        mem_fd: int | None = None
        try:
            try:
                fcntl.fcntl(wfd, _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # keep the default size
            self._pipe_bytes = fcntl.fcntl(wfd, _F_GETPIPE_SZ)
            # Shielded: a cancelled start must still see (and stop) the process it made.
            # Its own limiter: an application that fills anyio's shared default of 40
            # threads must not delay the writer's start.
            mem_fd = memory_pull.open_own_memory()
            with anyio.CancelScope(shield=True):
                popen = await anyio.to_thread.run_sync(
                    spawn, rfd, out_w, mem_fd, limiter=anyio.CapacityLimiter(1))
        except BaseException:
            os.close(wfd)
            os.close(out_r)
            raise
        finally:
            os.close(rfd)
            os.close(out_w)
            if mem_fd is not None:
                os.close(mem_fd)  # the child has its own
        self._wfd = wfd
        self._proc = Child(popen, out_r)
        self._owes_ready = False
        _LIVE.add(self)
        self._base = None
        self._can_pull = False
        # Bytes the writer process reads back through the handle if it can (the probe).
        self._probe = os.urandom(32) if memory_pull.supported() else b""
        probe_at = memory_pull.addresses([self._probe])[0][0] if self._probe else 0
        opening = wire.OpenRequest(self._location, self._wire_options, os.getpid(),
                                   self._lock_token, -1 if mem_fd is None else mem_fd,
                                   probe_at, self._probe)
        try:
            write_all(wfd, [memoryview(wire.encode(opening))])
            reply = await self._receive(_OPEN_REPLY)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                code = await self._stop()
            if isinstance(exc, Exception):
                raise StorageError(
                    f"the checkpoint writer process {describe_exit(code)} at start-up, "
                    f"before it opened {self._shown}"
                ) from exc
            raise
        if reply.error is not None:
            with anyio.CancelScope(shield=True):
                await self._stop()
            raise wire.rebuild_error(reply.error)
        # The child's pipeline keeps the set; this is its image in the training process,
        # taken again whenever a process starts and moved by each commit's report.
        self._known = {n: CheckpointRecord(n, e, s) for n, e, s in reply.records}
        self._can_pull = reply.can_pull
        return reply

    async def persist(self, snap: CapturedSnapshot) -> CommitReport:
        await self.ready()  # (or notice it died since its last reply)
        if self._proc is not None and self._proc.exited():
            await self._lost()  # after its Ready, or idle: OOM-killed between checkpoints
        if self._proc is None:
            await self._start()  # the previous process died: start over
        if self._hints_for is not self._proc:
            # A new process holds nothing of the last one's files.
            self._hints_for, self._log_bases, self._state_kept = self._proc, {}, {}
        try:
            full = False
            reply = await self._exchange(snap, full=full)
            # Each at most once: the whole memory (the previous file cannot be extended),
            # and another way than reading our memory (it was refused).
            for _ in range(2):
                if reply.cannot_pull and self._can_pull:
                    log.info("the checkpoint writer process cannot read this process's "
                             "memory: large checkpoints go through shared memory")
                    self._can_pull = False
                elif reply.resend_full and not full:
                    full = True
                else:
                    break
                reply = await self._exchange(snap, full=full)
        except _PIPE_ERRORS as exc:
            code = await self._stop()
            raise StorageError(
                # Nothing about what comes next: that is the error policy's to say (under
                # "warn" the next checkpoint starts a new process; "raise" stops here).
                f"the checkpoint writer process exited unexpectedly (it {describe_exit(code)}) "
                f"while writing episode {snap.episode_index}"
            ) from exc
        if reply.error is not None or reply.report is None:
            self._base = None
            self._log_bases, self._state_kept = {}, {}
            raise wire.rebuild_error(reply.error or wire.WireError("", "no report"))
        report = wire.report_of(reply)
        # A backend that cannot extend the file it just wrote (no server-side copy) gets
        # the whole memory next time at once, not a delta and then a resend.
        self._base = (report.log_id, report.nbytes) if report.extendable else None
        self._log_bases = dict(report.logs_extendable)
        self._state_kept = dict(report.state_kept)
        self._known[report.name] = report.record
        for name in report.deleted:
            self._known.pop(name, None)
        self._owes_ready = report.preparing
        return report

    async def ready(self) -> None:
        """Return once the process has copied the next commit's prefix ahead (at once
        if it has nothing to copy); cancelling the wait loses nothing."""
        if self._owes_ready and self._proc is not None and self._proc.out is not None:
            try:
                await anyio.wait_readable(self._proc.out)
                with anyio.CancelScope(shield=True):
                    await self._take_ready()
            except _PIPE_ERRORS:
                await self._lost()

    async def _lost(self) -> None:
        # It died after its last reply, before anything else was sent: no checkpoint
        # is lost, and the next one starts another.
        with anyio.CancelScope(shield=True):
            code = await self._stop()
        log.warning("the checkpoint writer process %s between checkpoints; the next "
                    "checkpoint starts a new one", describe_exit(code))

    def stop_preparing(self) -> None:
        # The process stops copying ahead by itself when its stdin closes.
        pass

    async def _take_ready(self) -> None:
        if self._owes_ready:
            await self._receive(_READY)
            self._owes_ready = False

    def _request(self, snap: CapturedSnapshot, full: bool
                 ) -> tuple[wire.CommitRequest, list[memoryview]]:
        """The request for ``snap`` and the bytes the process lacks (all if ``full``)."""
        mem = snap.memory
        had_mem = None if full else self._base
        base = had_mem[1] if had_mem and had_mem[0] == mem.log_id \
            and had_mem[1] <= mem.nbytes else 0
        # State values first: the child needs them whole before it writes anything.
        views: list[memoryview] = []
        state: dict[str, wire.StateRef] = {}
        for key, item in snap.state.items():
            # The process has this version's file already: only the version crosses.
            sent = full or self._state_kept.get(key) != item.version
            data = item.value.data
            state[key] = wire.StateRef(item.file, item.version, len(data), sent)
            if sent:
                views.append(memoryview(data))
        views.extend(mem.iter_bytes(base))
        logs: dict[str, wire.LogDelta] = {}
        for name, cap in snap.logs.items():
            had = None if full else self._log_bases.get(name)
            lbase = had[1] if had is not None and had[0] == cap.log_id \
                and had[1] <= cap.nbytes else 0
            logs[name] = wire.LogDelta(cap.log_id, cap.entries, cap.nbytes, lbase)
            views.extend(cap.iter_bytes(lbase))
        req = wire.CommitRequest(snap.meta, mem.log_id, mem.entries, mem.nbytes, base, 0,
                                 logs=logs, state=state)
        return req, views

    async def _exchange(self, snap: CapturedSnapshot, *, full: bool) -> wire.CommitReply:
        assert self._wfd is not None
        with anyio.CancelScope(shield=True):  # (read by persist's ready() as a rule)
            await self._take_ready()
        req, views = self._request(snap, full)
        delta = sum(len(v) for v in views)
        frame = wire.encode(msgspec.structs.replace(req, payload=delta))
        if delta <= self._pipe_bytes - max(_HEADER_ROOM, len(frame)):
            # Only messages that fit the pipe are sent this way, and the child has read
            # everything before it answered the previous one, so the pipe is empty: this
            # write completes at once, without blocking the loop.
            write_all(self._wfd, [memoryview(frame), *views])
            return await self._receive(_COMMIT_REPLY)
        if delta <= self._pipe_bytes - _HEADER_ROOM:
            # A frame too big for the pipe (large extra_files or agent.json, thousands of
            # unchanged state keys) with a small payload: through the pipe, in pieces, as
            # the child reads them. A memfd is only for a payload that is large: never an
            # empty one, which the child could not map.
            await send_in_pieces(self._wfd, [memoryview(frame), *views])
            return await self._receive(_COMMIT_REPLY)
        if self._can_pull:
            frame = wire.encode(msgspec.structs.replace(
                req, pull=memory_pull.addresses(views), delta_bytes=delta))
            # Shielded up to the reply: the child reads the views' bytes until then.
            with anyio.CancelScope(shield=True):
                self._lent = views
                await send_in_pieces(self._wfd, [memoryview(frame)])
                reply = await self._receive(_COMMIT_REPLY)
                self._lent = None
                return reply
        fd = _new_delta_fd()
        try:
            # Its full size first: the child maps it at once and writes each slice as
            # the lengths that follow the frame say it has landed.
            os.ftruncate(fd, delta)
            # The child opens it by this path, which stays valid while we hold the fd.
            frame = wire.encode(msgspec.structs.replace(
                req, delta_file=f"/proc/{os.getpid()}/fd/{fd}", delta_bytes=delta))
            await send_in_pieces(self._wfd, [memoryview(frame)])
            # Shielded up to the reply, which must not stay in the pipe: the child waits
            # for every byte announced. A slice is a memcpy and an 8-byte note (a pipe
            # holds thousands), never a wait.
            with anyio.CancelScope(shield=True):
                batch: list[memoryview] = []
                size = filled = 0
                for i, view in enumerate(views, 1):
                    batch.append(view)
                    size += len(view)
                    # Each note announces new bytes: a note repeating the last total
                    # (empty views at the end) would stay unread in the pipe.
                    if size and (size >= _HANDOFF_SLICE_BYTES or i == len(views)):
                        write_all(fd, batch)
                        filled += size
                        write_all(self._wfd, [memoryview(wire.ARRIVED.pack(filled))])
                        batch, size = [], 0
                        await anyio.lowlevel.checkpoint()
                reply = await self._receive(_COMMIT_REPLY)
            return reply
        finally:
            os.close(fd)

    async def _receive(self, dec: msgspec.msgpack.Decoder[_T]) -> _T:
        assert self._proc is not None
        (n,) = wire.FRAME.unpack(await self._proc.receive_exactly(wire.FRAME.size))
        return wire.decode(dec, await self._proc.receive_exactly(n))

    async def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        wfd, self._wfd = self._wfd, None
        self._base = None
        _LIVE.discard(self)
        if wfd is not None:
            os.close(wfd)  # EOF: the child finishes and exits
        if proc is None:
            return None
        try:
            # Shielded (every caller shields it too): a cancelled close still waits for
            # the process, which finishes the commit in flight, so none is left holding
            # the directory's lock.
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(_CLOSE_TIMEOUT) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    proc.kill()
                    await proc.wait()
        finally:
            proc.close()
        self._lent = None  # it is gone: it reads nothing more
        return proc.returncode

    def _forget(self) -> None:
        """In a forked child: drop the parent's writer process without touching it."""
        self._forked = True
        if self._wfd is not None:
            os.close(self._wfd)
        if self._proc is not None:
            self._proc.close()
            _INHERITED.append(self._proc)
        self._wfd, self._proc, self._base = None, None, None

    async def aclose(self) -> None:
        code = await self._stop()
        if code not in (None, 0):
            # Every checkpoint it acknowledged is durable; one it did not is already
            # reported as failed. Closing must not replace the caller's own outcome.
            log.warning("the checkpoint writer process exited with code %s", code)
