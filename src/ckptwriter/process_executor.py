"""The parent side of the writer process: start it, feed it deltas, read its replies.

The writer process (``writer_process.py``) runs the commit pipeline in a child
interpreter with its own GIL, on another core. The loop sends one small frame per
checkpoint and only the memory bytes appended since the child's last commit; the child
copies the rest from its previous file. Nothing is pickled: the bytes were encoded once,
when the entries were appended.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from . import wire
from .commit import CommitReport
from .errors import StorageError
from .options import WriterOptions
from .retention import CheckpointRecord
from .snapshot import CapturedSnapshot
from .storage.posix_io import write_all

__all__ = ["ProcessExecutor"]

_T = TypeVar("_T")

log = logging.getLogger("ckptwriter")

# The pipe to the writer process is enlarged to this (Linux lets any user go to 1 MiB),
# so that a typical checkpoint fits in it and the loop writes it without ever blocking.
_PIPE_BYTES = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# The child runs this, with its own package directory first on sys.path: `-m` would put
# the user's working directory there, where a local `secrets.py` could shadow stdlib.
_CHILD_CODE = (
    "import sys; sys.path[0] = sys.argv[1]; "
    "from ckptwriter.writer_process import main; sys.exit(main())"
)
# A delta that does not fit the pipe goes to the writer process in memory shared through
# a file (a memfd: RAM, never written back to disk), and the child maps it. The loop copies
# it in itself, a slice per iteration: a memcpy never blocks, and a worker thread would
# need the GIL, which a CPU-bound loop can starve it of for seconds.
_HANDOFF_SLICE_BYTES = 8 * 1024 * 1024
# Room for the frame in the pipe beside the delta.
_HEADER_ROOM = 64 * 1024
# How long a closing writer process may take to finish before it is killed.
_CLOSE_TIMEOUT = 30.0
# Where the ckptwriter package lives, so the child imports this very copy of it.
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)

_OPEN_REPLY = wire.decoder(wire.OpenReply)
_COMMIT_REPLY = wire.decoder(wire.CommitReply)
# What a dead or dying child looks like from this side of the pipe.
_PIPE_ERRORS = (OSError, anyio.EndOfStream, anyio.IncompleteRead,
                anyio.ClosedResourceError, anyio.BrokenResourceError)


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

    The process dies with its parent, ignores SIGINT/SIGTERM (the parent decides when to
    stop and drains first) and exits when its stdin closes. If it dies unexpectedly, the
    checkpoint in flight fails and the next one starts a new one.
    """

    kind = "process"

    def __init__(self, location: str, options: WriterOptions) -> None:
        self._open_msg = wire.encode(
            wire.OpenRequest(location, options.to_wire(), os.getpid(), uuid.uuid4().hex)
        )
        self._proc: Process | None = None
        self._rx: BufferedByteReceiveStream | None = None
        self._wfd: int | None = None
        self._pipe_bytes = 65536
        # (log_id, nbytes) of the memory file the process committed last: deltas start there.
        self._base: tuple[str, int] | None = None
        self._known: dict[str, CheckpointRecord] = {}

    async def open(self) -> list[CheckpointRecord]:
        reply = await self._start()
        return [CheckpointRecord(n, e, s) for n, e, s in reply.records]

    def checkpoints(self) -> list[CheckpointRecord]:
        return sorted(self._known.values(), key=lambda r: r.episode_index)

    async def _start(self) -> wire.OpenReply:
        # Our own pipe for the child's stdin: a blocking fd the loop writes small frames
        # to directly (large deltas go through a memfd).
        rfd, wfd = os.pipe()
        try:
            try:
                fcntl.fcntl(wfd, _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # keep the default size
            self._pipe_bytes = fcntl.fcntl(wfd, _F_GETPIPE_SZ)
            self._proc = await anyio.open_process(
                [sys.executable, "-c", _CHILD_CODE, _PKG_ROOT],
                stdin=rfd, stdout=subprocess.PIPE, stderr=None,
            )
        except BaseException:
            os.close(wfd)
            raise
        finally:
            os.close(rfd)
        self._wfd = wfd
        assert self._proc.stdout is not None
        self._rx = BufferedByteReceiveStream(self._proc.stdout)
        self._base = None
        try:
            write_all(wfd, [memoryview(self._open_msg)])
            reply = await self._receive(_OPEN_REPLY)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                code = await self._stop()
            if isinstance(exc, Exception):
                raise StorageError(
                    f"the checkpoint writer process exited at start-up (exit code {code}); "
                    "its error is printed above"
                ) from exc
            raise
        if reply.error is not None:
            with anyio.CancelScope(shield=True):
                await self._stop()
            raise wire.rebuild_error(reply.error)
        # The child's pipeline keeps the set; this is its image in the training process,
        # taken again whenever a process starts and moved by each commit's report.
        self._known = {n: CheckpointRecord(n, e, s) for n, e, s in reply.records}
        return reply

    async def persist(self, snap: CapturedSnapshot) -> CommitReport:
        if self._proc is None:
            await self._start()  # the previous process died: start over
        mem = snap.memory
        base = 0
        if self._base is not None and self._base[0] == mem.log_id and self._base[1] <= mem.nbytes:
            base = self._base[1]
        try:
            reply = await self._exchange(snap, base)
            if reply.resend_full:
                reply = await self._exchange(snap, 0)
        except _PIPE_ERRORS as exc:
            code = await self._stop()
            raise StorageError(
                f"the checkpoint writer process exited unexpectedly (exit code {code}) "
                f"while writing episode {snap.episode_index}; a new one starts with the "
                f"next checkpoint"
            ) from exc
        if reply.error is not None or reply.report is None:
            self._base = None
            raise wire.rebuild_error(reply.error or wire.WireError("", "no report"))
        report = reply.report
        # A backend that cannot extend the file it just wrote (no server-side copy) gets
        # the whole memory next time at once, not a delta and then a resend.
        self._base = (report.log_id, report.nbytes) if report.extendable else None
        self._known[report.name] = report.record
        for name in report.deleted:
            self._known.pop(name, None)
        return report

    async def _exchange(self, snap: CapturedSnapshot, base: int) -> wire.CommitReply:
        assert self._wfd is not None
        mem = snap.memory
        delta = mem.nbytes - base
        if delta <= self._pipe_bytes - _HEADER_ROOM:
            frame = wire.encode(wire.CommitRequest(
                snap.meta, mem.log_id, mem.entries, mem.nbytes, base, delta))
            # Only messages that fit the pipe are sent this way, and the child has read
            # everything before it answered the previous one, so the pipe is empty: this
            # write completes at once, without blocking the loop.
            write_all(self._wfd, [memoryview(frame), *mem.iter_bytes(base)])
            return await self._receive(_COMMIT_REPLY)
        fd = _new_delta_fd()
        try:
            batch: list[memoryview] = []
            size = 0
            for view in mem.iter_bytes(base):
                batch.append(view)
                size += len(view)
                if size >= _HANDOFF_SLICE_BYTES:
                    write_all(fd, batch)
                    batch, size = [], 0
                    await anyio.lowlevel.checkpoint()
            write_all(fd, batch)
            # The child opens it by this path, which stays valid while we hold the fd.
            frame = wire.encode(wire.CommitRequest(
                snap.meta, mem.log_id, mem.entries, mem.nbytes, base, 0,
                delta_file=f"/proc/{os.getpid()}/fd/{fd}"))
            write_all(self._wfd, [memoryview(frame)])
            return await self._receive(_COMMIT_REPLY)
        finally:
            os.close(fd)

    async def _receive(self, dec: msgspec.msgpack.Decoder[_T]) -> _T:
        assert self._rx is not None
        (n,) = wire.FRAME.unpack(await self._rx.receive_exactly(wire.FRAME.size))
        return wire.decode(dec, await self._rx.receive_exactly(n))

    async def _stop(self) -> int | None:
        proc, self._proc, self._rx = self._proc, None, None
        wfd, self._wfd = self._wfd, None
        self._base = None
        if wfd is not None:
            os.close(wfd)  # EOF: the child finishes and exits
        if proc is None:
            return None
        with anyio.move_on_after(_CLOSE_TIMEOUT) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
        return proc.returncode

    async def aclose(self) -> None:
        code = await self._stop()
        if code not in (None, 0):
            # Every checkpoint it acknowledged is durable; one it did not is already
            # reported as failed. Closing must not replace the caller's own outcome.
            log.warning("the checkpoint writer process exited with code %s", code)
