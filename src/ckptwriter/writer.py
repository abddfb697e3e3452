"""The background checkpoint writer: bounded queue, one writer task, one worker thread.

``submit`` captures a snapshot (O(1) in the memory size) and queues it; a single writer
task takes snapshots in order and runs each commit, pointer update and retention pass in
one worker-thread call, so a checkpoint costs the event loop one thread hop.

Backpressure is a named policy: ``block`` makes ``submit`` wait for room (counted as a
stall); ``coalesce`` replaces the newest queued, not yet started snapshot with the new
one (counted as coalesced), so the loop never waits and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Collection, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import ConfigError, WriterClosedError, WriterFailedError
from .executor import Executor, Persister, PersistResult, ProcessExecutor, ThreadExecutor
from .retention import CheckpointRecord, Strategy, make_policy
from .snapshot import CapturedSnapshot, Snapshot
from .storage import Storage, is_local, open_storage

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

__all__ = [
    "CheckpointHandle",
    "CheckpointResult",
    "CheckpointWriter",
    "WriterStats",
    "switch_interval",
]

log = logging.getLogger("ckptwriter")

OnBacklog = Literal["block", "coalesce"]
OnError = Literal["raise", "warn"]
ExecutorKind = Literal["auto", "thread", "process"]
# Samples kept for submit-latency percentiles: enough for a p99 over a long window.
_SAMPLES = 10_000
# A small commit still running after this long almost always means the worker thread is
# starved of the GIL by a loop that never blocks; say so once, with the fix.
_STARVED_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    """A checkpoint that is durable on disk, and what it cost.

    ``loop_seconds`` is what the training loop paid in ``submit`` (capture + enqueue,
    including any ``block`` stall); the other timings were spent off the loop.
    """

    name: str
    path: str
    episode_index: int
    bytes_written: int
    bytes_serialized: int
    entries_serialized: int
    incremental: bool
    loop_seconds: float
    queue_wait_seconds: float
    serialize_seconds: float
    write_seconds: float
    latency_seconds: float
    deleted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of a writer since it started (a consistent copy; see ``writer.stats``)."""

    submitted: int = 0
    written: int = 0
    coalesced: int = 0
    failed: int = 0
    pending: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    loop_seconds_total: float = 0.0
    loop_seconds_max: float = 0.0
    queue_wait_seconds_total: float = 0.0
    serialize_seconds_total: float = 0.0
    write_seconds_total: float = 0.0
    bytes_written: int = 0
    bytes_serialized: int = 0
    entries_serialized: int = 0
    deleted: int = 0
    retention_errors: int = 0
    loop_seconds_samples: tuple[float, ...] = ()

    def loop_seconds_quantile(self, q: float) -> float:
        """A quantile (0..1) of the recent per-submit loop times; 0.0 with no samples."""
        s = sorted(self.loop_seconds_samples)
        if not s:
            return 0.0
        return s[min(len(s) - 1, math.ceil(q * len(s)) - 1 if q > 0 else 0)]


class _Job:
    __slots__ = ("enqueued_at", "error", "event", "handle", "loop_seconds", "result",
                 "snap", "started")

    def __init__(self, snap: CapturedSnapshot) -> None:
        self.snap = snap
        self.event = anyio.Event()
        self.started = False
        self.enqueued_at = 0.0
        self.loop_seconds = 0.0
        self.result: CheckpointResult | None = None
        self.error: BaseException | None = None
        # The newest handle only: older ones were marked coalesced when they were replaced,
        # and keeping them all would grow without bound while a slow write is in flight.
        self.handle: CheckpointHandle | None = None


class CheckpointHandle:
    """The future of one submitted snapshot.

    ``await handle.wait()`` returns once the snapshot (or, if it was coalesced, the newer
    snapshot that replaced it) is durable on disk.
    """

    __slots__ = ("_job", "coalesced", "episode_index")

    def __init__(self, job: _Job) -> None:
        self._job = job
        self.episode_index = job.snap.episode_index
        self.coalesced = False

    def done(self) -> bool:
        """True once the checkpoint is durable or has failed."""
        return self._job.event.is_set()

    async def wait(self) -> CheckpointResult:
        """Wait until durable.

        Raises:
            WriterFailedError: this checkpoint could not be written.
        """
        await self._job.event.wait()
        return self.result()

    def result(self) -> CheckpointResult:
        """The result of a done handle (see :meth:`done`), without waiting.

        Raises:
            WriterFailedError: this checkpoint could not be written.
            RuntimeError: the checkpoint is not done yet.
        """
        if not self._job.event.is_set():
            raise RuntimeError("checkpoint not written yet: await handle.wait()")
        if self._job.error is not None:
            raise WriterFailedError(
                f"checkpoint for episode {self.episode_index} was not written: {self._job.error}"
            ) from self._job.error
        assert self._job.result is not None
        return self._job.result


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class CheckpointWriter:
    """Asynchronous checkpoint writer service (an async context manager).

    Args:
        checkpoint_dir: checkpoints directory (local path or fsspec URL).
        strategy: ``all``, ``last_n`` or ``top_k_val``; default ``all`` without
            ``keep_last`` and ``last_n`` with it.
        keep_last: N for ``last_n``, K for ``top_k_val``.
        max_pending: snapshots that may wait in the queue besides the one being written.
        on_backlog: ``block`` (submit waits for room) or ``coalesce`` (replace the newest
            queued snapshot; submit never waits).
        fsync: make each checkpoint durable before ``latest`` moves.
        on_error: ``raise`` (the next submit/flush/exit raises :class:`WriterFailedError`)
            or ``warn`` (log, count, keep going; the next checkpoint is tried again).
        protect: checkpoint names retention must never delete.
        storage: a storage backend, instead of one built from ``checkpoint_dir``.
        executor: where the blocking work runs. ``process``: a long-lived writer process
            with its own GIL, so a CPU-bound loop can neither starve it nor pay for it;
            ``thread``: a worker thread (for ``storage`` objects and in-process stores
            such as ``memory://``); ``auto`` (default): ``process`` for a local
            ``checkpoint_dir`` on POSIX, ``thread`` otherwise.

    Raises:
        ConfigError: an invalid strategy/keep_last/max_pending combination.

    Cancellation:
        Cancelling the enclosing scope stops the writer after the commit in progress
        (a commit is never left half-done; its temp directory is cleaned on failure).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path | None = None,
        *,
        strategy: Strategy | None = None,
        keep_last: int | None = None,
        max_pending: int = 2,
        on_backlog: OnBacklog = "block",
        fsync: bool = True,
        on_error: OnError = "raise",
        protect: Collection[str] = (),
        storage: Storage | None = None,
        executor: ExecutorKind = "auto",
    ) -> None:
        policy = make_policy(strategy, keep_last)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if on_backlog not in ("block", "coalesce"):
            raise ConfigError(f"on_backlog must be 'block' or 'coalesce', got {on_backlog!r}")
        if on_error not in ("raise", "warn"):
            raise ConfigError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if executor not in ("auto", "thread", "process"):
            raise ConfigError(
                f"executor must be 'auto', 'thread' or 'process', got {executor!r}"
            )
        if storage is None and checkpoint_dir is None:
            raise ConfigError("CheckpointWriter needs checkpoint_dir or storage")
        location = storage.location if storage is not None else os.fspath(checkpoint_dir or "")
        local = storage is None and is_local(location)
        if local:
            # Fixed now: a later chdir must not send checkpoints somewhere else.
            location = os.path.abspath(location.removeprefix("file://"))
        if executor == "process" and not local:
            raise ConfigError(
                "executor='process' needs a local checkpoint_dir (the writer process opens "
                "it itself); use executor='thread' with a storage object or a URL"
            )
        if executor == "process" or (executor == "auto" and local and os.name == "posix"):
            self._executor: Executor = ProcessExecutor(
                location, fsync=fsync, strategy=strategy, keep_last=keep_last, protect=protect
            )
        else:
            if storage is None:
                storage = open_storage(location, fsync=fsync)
            self._executor = ThreadExecutor(Persister(storage, policy, protect))
        self._location = location
        self._max_pending = max_pending
        self._on_backlog: OnBacklog = on_backlog
        self._on_error: OnError = on_error
        self._state = _State.NEW
        self._error: WriterFailedError | None = None
        self._known: dict[str, CheckpointRecord] = {}
        self._queued: deque[_Job] = deque()
        self._in_flight: _Job | None = None
        self._in_flight_since = 0.0
        self._warned_starved = False
        self._samples: deque[float] = deque(maxlen=_SAMPLES)
        self._counts: dict[str, Any] = dict.fromkeys(
            ("submitted", "written", "coalesced", "failed", "stalls", "deleted",
             "retention_errors", "bytes_written", "bytes_serialized", "entries_serialized"), 0)
        self._times: dict[str, float] = dict.fromkeys(
            ("stall", "loop", "loop_max", "queue_wait", "serialize", "write"), 0.0)
        self._stack: AsyncExitStack | None = None
        self._send: MemoryObjectSendStream[_Job] | None = None
        self._done: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def location(self) -> str:
        """Where checkpoints go."""
        return self._location

    @property
    def executor(self) -> str:
        """``"process"`` or ``"thread"``: where the blocking work runs."""
        return self._executor.kind

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise WriterClosedError(
                f"this CheckpointWriter is {self._state.value}; it can be entered only once, "
                "create a new one"
            )
        # Open the storage first (lock, leftovers, listing) so its errors reach the caller
        # as they are, not wrapped in the task group's ExceptionGroup.
        try:
            records = await self._executor.open()
        except BaseException:
            # Cancelled while opening: the open may have completed (lock taken) anyway.
            with anyio.CancelScope(shield=True):
                await self._executor.aclose()
            raise
        self._known = {r.name: r for r in records}
        send, recv = anyio.create_memory_object_stream[_Job](self._max_pending)
        self._send = send
        self._done = anyio.Event()
        stack = AsyncExitStack()
        try:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._tg.start(self._run, recv)
        except BaseException:
            send.close()
            recv.close()
            # The task group is exited as it was entered (no extra scope around it: anyio
            # requires scopes to be exited in order); the lock is released in any case.
            try:
                await stack.aclose()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._executor.aclose()
            raise
        self._stack = stack
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self._close(exc_type, exc, tb)
        if exc is None:
            self._raise_if_failed()
        return None

    async def aclose(self) -> None:
        """Drain the queue, stop the writer and release the directory lock.

        Raises:
            WriterFailedError: a checkpoint failed and was not reported yet.
        """
        await self._close(None, None, None)
        self._raise_if_failed()

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        assert self._send is not None
        assert self._stack is not None
        assert self._done is not None
        assert self._tg is not None
        self._send.close()
        # Drain on normal exit and on an ordinary exception from the body, so progress
        # made before a crash in the training code is still saved. Cancellation skips it.
        if exc is None or isinstance(exc, Exception):
            with anyio.CancelScope(shield=True):
                await self._done.wait()
        else:
            self._tg.cancel_scope.cancel()
        try:
            # The body's exception is not passed in: the task group would wrap it in an
            # ExceptionGroup, and the caller should see its own exception unchanged.
            await self._stack.__aexit__(None, None, None)
        finally:
            self._state = _State.CLOSED

    def _raise_if_failed(self) -> None:
        # Only on_error="raise" records an error, and it stays: every later call raises.
        if self._error is not None:
            raise self._error

    # -- submit ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state is not _State.OPEN:
            raise WriterClosedError(
                f"CheckpointWriter is {self._state.value}: use it inside "
                "`async with CheckpointWriter(...) as writer:`"
            )

    async def submit(self, snapshot: Snapshot | CapturedSnapshot) -> CheckpointHandle:
        """Capture ``snapshot`` and queue it; return as soon as it is queued.

        Returns:
            a handle; ``await handle.wait()`` for durability.

        Raises:
            WriterFailedError: an earlier checkpoint failed (``on_error="raise"``).
            WriterClosedError: the writer is not open.
            CheckpointError: the snapshot cannot be captured.

        Cancellation:
            Under ``block``, cancelling a waiting submit queues nothing.
        """
        t0 = time.perf_counter()
        self._check_open()
        if (
            self._in_flight is not None
            and self._executor.kind == "thread"
            and not self._warned_starved
            and t0 - self._in_flight_since > _STARVED_SECONDS
        ):
            self._warn_starved(t0 - self._in_flight_since)
        job = _Job(snapshot.capture() if isinstance(snapshot, Snapshot) else snapshot)
        handle = CheckpointHandle(job)
        job.handle = handle
        assert self._send is not None
        self._counts["submitted"] += 1
        try:
            job.enqueued_at = time.perf_counter()
            self._send.send_nowait(job)
            self._queued.append(job)
        except anyio.WouldBlock:
            if self._on_backlog == "coalesce" and self._queued:
                # The queued snapshot is replaced by the newer one: its handles now
                # resolve when the newer state is durable, and say they were coalesced.
                target = self._queued[-1]
                if target.handle is not None:
                    target.handle.coalesced = True
                handle._job = target
                target.handle = handle
                target.snap = job.snap
                self._counts["coalesced"] += 1
            else:
                self._counts["stalls"] += 1
                s0 = time.perf_counter()
                # Listed before the send completes: the writer may take the job at once.
                self._queued.append(job)
                try:
                    await self._send.send(job)
                except BaseException:
                    if job in self._queued:
                        self._queued.remove(job)
                    raise
                job.enqueued_at = time.perf_counter()
                self._times["stall"] += job.enqueued_at - s0
        self._record_loop_time(handle, time.perf_counter() - t0)
        return handle

    def _record_loop_time(self, handle: CheckpointHandle, dt: float, *,
                          replace_last: bool = False) -> None:
        # The sync writer replaces the sample of its submit with the caller's full cost
        # (capture + thread hop); submits through its portal never interleave.
        job = handle._job
        if replace_last and self._samples:
            self._times["loop"] -= self._samples.pop()
        job.loop_seconds = dt
        self._samples.append(dt)
        self._times["loop"] += dt
        self._times["loop_max"] = max(self._times["loop_max"], dt)

    async def flush(self) -> None:
        """Wait until everything submitted so far is durable (or has failed).

        Raises:
            WriterFailedError: a checkpoint failed (``on_error="raise"``).
        """
        self._check_open()
        jobs = list(self._queued)
        if self._in_flight is not None:
            jobs.append(self._in_flight)
        for job in jobs:
            await job.event.wait()
        self._raise_if_failed()

    def _warn_starved(self, seconds: float) -> None:
        self._warned_starved = True
        log.warning(
            "checkpoint for episode %d has been in progress for %.1f s: if the training loop "
            "never really blocks, it starves the writer thread of the GIL; wrap the loop in "
            "`with ckptwriter.switch_interval():` (see README, 'Where the writer runs')",
            self._in_flight.snap.episode_index if self._in_flight else -1, seconds,
        )

    @property
    def stats(self) -> WriterStats:
        """A consistent copy of the writer's counters."""
        c, t = self._counts, self._times
        return WriterStats(
            submitted=c["submitted"], written=c["written"], coalesced=c["coalesced"],
            failed=c["failed"], pending=len(self._queued) + (self._in_flight is not None),
            stalls=c["stalls"], stall_seconds=t["stall"], loop_seconds_total=t["loop"],
            loop_seconds_max=t["loop_max"], queue_wait_seconds_total=t["queue_wait"],
            serialize_seconds_total=t["serialize"], write_seconds_total=t["write"],
            bytes_written=c["bytes_written"], bytes_serialized=c["bytes_serialized"],
            entries_serialized=c["entries_serialized"], deleted=c["deleted"],
            retention_errors=c["retention_errors"],
            loop_seconds_samples=tuple(self._samples),
        )

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        """Checkpoints the writer knows are committed, oldest first."""
        return sorted(self._known.values(), key=lambda r: r.episode_index)

    # -- the writer task -------------------------------------------------------------

    async def _run(
        self,
        recv: MemoryObjectReceiveStream[_Job],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self._done is not None
        try:
            task_status.started()
            try:
                async with recv:
                    async for job in recv:
                        await self._write_one(job)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._executor.aclose()
        finally:
            # A cancelled writer stops with snapshots still queued: their handles fail
            # (and flush returns) instead of leaving waiters blocked forever.
            dropped = WriterClosedError(
                "the writer was cancelled before this checkpoint was written"
            )
            while self._queued:
                job = self._queued.popleft()
                self._counts["failed"] += 1
                job.error = dropped
                job.event.set()
            self._done.set()

    async def _write_one(self, job: _Job) -> None:
        self._queued.remove(job)
        job.started = True
        self._in_flight = job
        started = self._in_flight_since = time.perf_counter()
        wait = started - job.enqueued_at
        try:
            if self._error is not None:
                raise self._error
            # A commit in progress is never abandoned half-way: the thread or process
            # finishes it, and the process protocol must not lose its place.
            with anyio.CancelScope(shield=True):
                result = await self._executor.persist(job.snap)
        except Exception as exc:
            self._fail(job, exc)
        else:
            self._succeed(job, result, wait)
        finally:
            self._in_flight = None
            job.event.set()

    def _succeed(self, job: _Job, o: PersistResult, wait: float) -> None:
        c, t = self._counts, self._times
        c["written"] += 1
        c["bytes_written"] += o.bytes_written
        c["bytes_serialized"] += o.bytes_serialized
        c["entries_serialized"] += o.entries_serialized
        c["deleted"] += len(o.deleted)
        t["queue_wait"] += wait
        t["serialize"] += o.serialize_seconds
        t["write"] += o.write_seconds
        self._known[o.name] = o.record
        for name in o.deleted:
            self._known.pop(name, None)
        if o.retention_error is not None:
            c["retention_errors"] += 1
            log.warning("retention could not delete an old checkpoint: %s", o.retention_error)
        job.result = CheckpointResult(
            name=o.name, path=o.path, episode_index=job.snap.episode_index,
            bytes_written=o.bytes_written, bytes_serialized=o.bytes_serialized,
            entries_serialized=o.entries_serialized, incremental=o.incremental,
            loop_seconds=job.loop_seconds, queue_wait_seconds=wait,
            serialize_seconds=o.serialize_seconds, write_seconds=o.write_seconds,
            latency_seconds=time.perf_counter() - job.snap.captured_at,
            deleted=tuple(o.deleted),
        )

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._counts["failed"] += 1
        job.error = exc
        if isinstance(exc, WriterFailedError):
            return
        msg = f"checkpoint for episode {job.snap.episode_index} failed: {exc}"
        if self._on_error == "warn":
            log.warning("%s (training continues; the next checkpoint will be tried)", msg)
            return
        if self._error is None:
            err = WriterFailedError(msg)
            err.__cause__ = exc
            self._error = err


@contextlib.contextmanager
def switch_interval(seconds: float = 0.0005) -> Iterator[None]:
    """Lower CPython's GIL switch interval for the duration of a block.

    In a CPU-bound loop that never really blocks, a background writer thread at the
    default 5 ms interval can wait that long for every syscall it returns from; at
    0.5 ms it keeps up. This changes an interpreter-wide setting, so the library never
    does it on its own: the ``ckptwriter train`` runtime and benchmarks opt in here.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
