"""Where a checkpoint's blocking work runs: a worker thread, or a long-lived writer process.

Both run the same :class:`Persister` (commit, move ``latest``, apply retention) for one
checkpoint at a time; they differ in how they share the GIL with the training loop.

- :class:`ThreadExecutor` runs it in a worker thread of this process. Every syscall the
  writer makes releases and retakes the GIL, and a loop that never really blocks can
  starve that thread (see README, "Where the writer runs").
- :class:`ProcessExecutor` runs it in a child interpreter with its own GIL, on another
  core. The loop sends a small header and only the memory bytes appended since the
  child's last commit; the child copies the rest from its previous file. Nothing is
  pickled: the bytes were encoded once, when the entries were appended.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import subprocess
import sys
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from . import errors, layout
from .errors import CheckpointError, StorageError
from .memory import MemoryCapture
from .retention import CheckpointRecord, RetentionPolicy, make_policy, select_for_deletion
from .snapshot import CapturedSnapshot
from .storage import MemoryState, Storage
from .storage.local import write_all as _write_all

__all__ = ["Executor", "PersistResult", "Persister", "ProcessExecutor", "ThreadExecutor"]

log = logging.getLogger("ckptwriter")

_HEADER = struct.Struct(">I")
_PAYLOAD = struct.Struct(">Q")
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
# Room for the header in the pipe beside the delta.
_HEADER_ROOM = 64 * 1024
# How long a closing writer process may take to finish before it is killed.
_CLOSE_TIMEOUT = 30.0
# Where the ckptwriter package lives, so the child imports this very copy of it.
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)


class PersistResult(msgspec.Struct, frozen=True):
    """What persisting one checkpoint did (crosses the pipe from the writer process)."""

    name: str
    path: str
    episode_index: int
    val_score: float | None
    bytes_written: int
    bytes_serialized: int
    entries_serialized: int
    incremental: bool
    serialize_seconds: float
    write_seconds: float
    deleted: list[str]
    retention_error: str | None
    log_id: str
    nbytes: int

    @property
    def record(self) -> CheckpointRecord:
        """The retention view of the new checkpoint."""
        return CheckpointRecord(self.name, self.episode_index, self.val_score)


class Persister:
    """Commit, pointer update and retention for one checkpoints directory (blocking)."""

    def __init__(self, storage: Storage, policy: RetentionPolicy,
                 protect: Collection[str] = ()) -> None:
        self.storage = storage
        self.policy = policy
        self.protect = frozenset(protect)
        self.known: dict[str, CheckpointRecord] = {}
        self.mem: MemoryState | None = None

    def open(self) -> list[CheckpointRecord]:
        """Open the storage (lock, leftovers) and learn the checkpoints already there."""
        records = self.storage.open()
        self.known = {r.name: r for r in records}
        return records

    def close(self) -> None:
        """Release the storage's lock."""
        self.storage.close()

    def persist(self, snap: CapturedSnapshot) -> PersistResult:
        """Commit ``snap``, point ``latest`` at it, then delete what retention selects."""
        outcome = self.storage.commit(snap, self.mem)
        self.mem = outcome.memory
        # Known before the pointer moves: if that fails, retention still sees it later.
        self.known[outcome.name] = outcome.record
        self.storage.set_latest(outcome)
        doomed = select_for_deletion(
            list(self.known.values()), self.policy, protected=self.protect | {outcome.name}
        )
        deleted: list[str] = []
        retention_error = None
        for name in doomed:
            try:
                self.storage.delete(name)
            except CheckpointError as exc:
                # The new checkpoint is durable; this one stays known and is tried again
                # on the next pass. The others are still deleted now.
                retention_error = str(exc)
                continue
            del self.known[name]
            deleted.append(name)
        return PersistResult(
            name=outcome.name, path=outcome.path, episode_index=snap.episode_index,
            val_score=snap.val_score, bytes_written=outcome.bytes_written,
            bytes_serialized=outcome.bytes_serialized,
            entries_serialized=outcome.entries_serialized, incremental=outcome.incremental,
            serialize_seconds=outcome.serialize_seconds, write_seconds=outcome.write_seconds,
            deleted=deleted, retention_error=retention_error,
            log_id=outcome.memory.log_id, nbytes=outcome.memory.nbytes,
        )


class Executor(Protocol):
    """Runs a :class:`Persister` somewhere off the event loop."""

    kind: str

    async def open(self) -> list[CheckpointRecord]: ...
    async def persist(self, snap: CapturedSnapshot) -> PersistResult: ...
    async def aclose(self) -> None: ...


class ThreadExecutor:
    """One worker-thread hop per checkpoint."""

    kind = "thread"

    def __init__(self, persister: Persister) -> None:
        self._p = persister
        self._limiter: anyio.CapacityLimiter | None = None

    async def open(self) -> list[CheckpointRecord]:
        # Our own limiter (made here: it needs a running event loop): an application that
        # fills anyio's shared default of 40 threads must not delay its checkpoints.
        self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._p.open, limiter=self._limiter)

    async def persist(self, snap: CapturedSnapshot) -> PersistResult:
        return await anyio.to_thread.run_sync(self._p.persist, snap, limiter=self._limiter)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._p.close, limiter=self._limiter)


# -- the wire format between the loop and the writer process ----------------------------

_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder()
_RESULT_DEC = msgspec.msgpack.Decoder(PersistResult)


def encode_message(obj: Any) -> bytes:
    """One length-prefixed msgpack frame."""
    body = _ENC.encode(obj)
    return _HEADER.pack(len(body)) + body


def error_message(exc: BaseException) -> dict[str, Any]:
    """An exception as a frame body, for the other side to rebuild."""
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def rebuild_error(err: dict[str, str]) -> CheckpointError:
    """The exception a writer-process error stands for, in this process."""
    kind, message = err.get("type", ""), err.get("message", "")
    if kind in ("DirectoryLockedError", "ConfigError", "WriterFailedError"):
        cls: type[CheckpointError] = getattr(errors, kind)
        return cls(message)
    if kind == "StorageError":
        return StorageError(message)
    return StorageError(f"{kind}: {message}" if kind else message)


def snapshot_header(snap: CapturedSnapshot, base: int) -> dict[str, Any]:
    """Everything of a captured snapshot but its memory bytes."""
    mem = snap.memory
    return {
        "op": "commit", "episode_index": snap.episode_index,
        "train_steps_total": snap.train_steps_total, "agent_type": snap.agent_type,
        "memory_type": snap.memory_type, "val_score": snap.val_score,
        "agent_json": snap.agent_json, "extra_files": snap.extra_files,
        "resumed_from": snap.resumed_from, "timestamp": snap.timestamp.isoformat(),
        "log_id": mem.log_id, "entries": mem.entries, "nbytes": mem.nbytes, "base": base,
    }


def snapshot_from_header(h: dict[str, Any], delta: bytes | mmap.mmap) -> CapturedSnapshot:
    """Rebuild, in the writer process, the snapshot a header and its delta describe."""
    nbytes, base = int(h["nbytes"]), int(h["base"])
    memory = MemoryCapture(
        log_id=h["log_id"], entries=int(h["entries"]), nbytes=nbytes,
        chunks=[delta], chunk_ends=[nbytes], n_chunks=1 if delta else 0, base=base,
    )
    return CapturedSnapshot(
        episode_index=h["episode_index"], train_steps_total=h["train_steps_total"],
        agent_type=h["agent_type"], memory_type=h["memory_type"], val_score=h["val_score"],
        memory=memory, agent_json=h["agent_json"], extra_files=dict(h["extra_files"]),
        resumed_from=h["resumed_from"], timestamp=datetime.fromisoformat(h["timestamp"]),
        captured_at=0.0,
    )


def _new_delta_fd(location: str) -> int:
    """An empty fd for a large delta: a memfd, or an unlinked file beside the checkpoints."""
    try:
        return os.memfd_create("ckptwriter-delta", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        # No memfd (not Linux): an unlinked temp file; it vanishes with the last fd.
        path = os.path.join(location, layout.temp_name("delta"))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)
        return fd


class ProcessExecutor:
    """A long-lived writer process, started by :meth:`open`, stopped by :meth:`aclose`.

    The process dies with its parent (``PR_SET_PDEATHSIG``), ignores SIGINT/SIGTERM (the
    parent decides when to stop and drains first) and exits when its stdin closes. If it
    dies unexpectedly, the checkpoint in flight fails and the next one starts a new one.
    """

    kind = "process"

    def __init__(self, location: str, *, fsync: bool, strategy: str | None,
                 keep_last: int | None, protect: Collection[str]) -> None:
        # Validate here too, so a bad policy fails before a process is started.
        make_policy(strategy, keep_last)
        self._location = location
        self._open_msg = {
            "op": "open", "location": location, "fsync": fsync, "strategy": strategy,
            "keep_last": keep_last, "protect": sorted(protect),
        }
        self._proc: Process | None = None
        self._rx: BufferedByteReceiveStream | None = None
        self._wfd: int | None = None
        self._pipe_bytes = 65536
        # (log_id, nbytes) of the memory file the process committed last: deltas start there.
        self._base: tuple[str, int] | None = None

    async def open(self) -> list[CheckpointRecord]:
        reply = await self._start()
        return [CheckpointRecord(n, e, s) for n, e, s in reply["records"]]

    async def _start(self) -> dict[str, Any]:
        # Our own pipe for the child's stdin: a blocking fd that a worker thread can write
        # a large delta to in one syscall, while the loop writes small ones directly.
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
            await self._send([memoryview(encode_message(self._open_msg))])
            reply = await self._receive()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                code = await self._stop()
            if isinstance(exc, Exception):
                raise StorageError(
                    f"the checkpoint writer process exited at start-up (exit code {code}); "
                    "its error is printed above"
                ) from exc
            raise
        if "error" in reply:
            with anyio.CancelScope(shield=True):
                await self._stop()
            raise rebuild_error(reply["error"])
        return reply

    async def persist(self, snap: CapturedSnapshot) -> PersistResult:
        if self._proc is None:
            await self._start()  # the previous process died: start over
        mem = snap.memory
        base = 0
        if self._base is not None and self._base[0] == mem.log_id and self._base[1] <= mem.nbytes:
            base = self._base[1]
        try:
            reply = await self._exchange(snap, base)
            if reply.get("resend_full"):
                reply = await self._exchange(snap, 0)
        except (OSError, anyio.EndOfStream, anyio.IncompleteRead,
                anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            code = await self._stop()
            raise StorageError(
                f"the checkpoint writer process exited unexpectedly (exit code {code}) "
                f"while writing episode {snap.episode_index}; a new one starts with the "
                f"next checkpoint"
            ) from exc
        if "error" in reply:
            self._base = None
            raise rebuild_error(reply["error"])
        result = _RESULT_DEC.decode(reply["result"])
        self._base = (result.log_id, result.nbytes)
        return result

    async def _exchange(self, snap: CapturedSnapshot, base: int) -> dict[str, Any]:
        mem = snap.memory
        header = snapshot_header(snap, base)
        if mem.nbytes - base <= self._pipe_bytes - _HEADER_ROOM:
            head = encode_message(header) + _PAYLOAD.pack(mem.nbytes - base)
            await self._send([memoryview(head), *mem.iter_bytes(base)])
            return await self._receive()
        fd = _new_delta_fd(self._location)
        try:
            batch: list[memoryview] = []
            size = 0
            for view in mem.iter_bytes(base):
                batch.append(view)
                size += len(view)
                if size >= _HANDOFF_SLICE_BYTES:
                    _write_all(fd, batch)
                    batch, size = [], 0
                    await anyio.lowlevel.checkpoint()
            _write_all(fd, batch)
            # The child opens it by this path, which stays valid while we hold the fd.
            header["delta_file"] = f"/proc/{os.getpid()}/fd/{fd}"
            await self._send([memoryview(encode_message(header) + _PAYLOAD.pack(0))])
            return await self._receive()
        finally:
            os.close(fd)

    async def _send(self, views: list[memoryview]) -> None:
        assert self._wfd is not None
        # Only messages that fit the pipe are sent (larger deltas go through a memfd), and
        # the child has read everything before it answered the previous message, so the
        # pipe is empty: this write completes at once, without blocking the loop.
        _write_all(self._wfd, views)

    async def _receive(self) -> dict[str, Any]:
        assert self._rx is not None
        (n,) = _HEADER.unpack(await self._rx.receive_exactly(_HEADER.size))
        msg = _DEC.decode(await self._rx.receive_exactly(n))
        assert isinstance(msg, dict)
        return msg

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
