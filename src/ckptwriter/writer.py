"""The background checkpoint writer: lifecycle, bounded queue, backpressure, handles.

``submit`` captures a snapshot (O(1) in the memory size) and queues it; a single writer
task takes snapshots in order and hands each to an executor (a writer process or a
worker thread) that runs the commit pipeline, so a checkpoint costs the event loop one
small message or one thread hop.

Backpressure is a named policy: ``block`` makes ``submit`` wait for room (counted as a
stall); ``coalesce`` replaces the newest queued, not yet started snapshot with the new
one (counted as coalesced), so the loop never waits and memory stays bounded.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from collections import deque
from collections.abc import Collection, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .commit import best_of
from .errors import WriterClosedError, WriterFailedError
from .executor import make_executor
from .existing_steps import EpisodeGuard
from .gil import warn_starved
from .handles import CheckpointHandle, CheckpointResult, Job
from .options import DEFAULTS, ExecutorKind, OnBacklog, OnError, WriterOptions
from .retention import CheckpointRecord, Mode, Strategy
from .snapshot import CapturedSnapshot, Snapshot
from .stats import Counters, WriterStats
from .storage import Backend

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

__all__ = ["CheckpointWriter"]

log = logging.getLogger("ckptwriter")

# A small commit still running after this long almost always means the worker thread is
# starved of the GIL by a loop that never blocks; say so once, with the fix.
_STARVED_SECONDS = 5.0


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
        mode: ``max`` (default) or ``min``: whether a higher or lower ``val_score`` is
            better, for ``top_k_val`` and the ``best`` pointer.
        keep_every: checkpoints whose episode is a multiple of this are never deleted.
        max_pending: snapshots that may wait in the queue besides the one being written.
        on_backlog: ``block`` (submit waits for room) or ``coalesce`` (replace the newest
            queued snapshot; submit never waits).
        fsync: make each checkpoint durable before ``latest`` moves.
        on_error: ``raise`` (the next submit/flush/exit raises :class:`WriterFailedError`)
            or ``warn`` (log, count, keep going; the next checkpoint is tried again).
        protect: checkpoint names retention must never delete.
        storage: a storage backend, instead of one built from ``checkpoint_dir``.
        storage_options: passed to fsspec when ``checkpoint_dir`` is a URL.
        executor: where the blocking work runs. ``process``: a long-lived writer process
            with its own GIL, so a CPU-bound loop can neither starve it nor pay for it;
            ``thread``: a worker thread (for ``storage`` objects and in-process stores
            such as ``memory://``); ``auto`` (default): ``process`` for a local
            ``checkpoint_dir`` on POSIX, ``thread`` otherwise.

    Defaults are :class:`~ckptwriter.options.WriterOptions`' own.

    Raises:
        ConfigError: an invalid option or strategy/keep_last combination.

    Cancellation:
        Cancelling the enclosing scope (or asyncio's ``task.cancel()``) stops the writer
        after the commit in progress, before the block is left (never half-done).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path | None = None,
        *,
        strategy: Strategy | None = DEFAULTS.strategy,
        keep_last: int | None = DEFAULTS.keep_last,
        mode: Mode = DEFAULTS.mode,
        keep_every: int | None = DEFAULTS.keep_every,
        max_pending: int = DEFAULTS.max_pending,
        on_backlog: OnBacklog = DEFAULTS.on_backlog,
        fsync: bool = DEFAULTS.fsync,
        on_error: OnError = DEFAULTS.on_error,
        protect: Collection[str] = DEFAULTS.protect,
        storage: Backend | None = None,
        executor: ExecutorKind = DEFAULTS.executor,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        # model_validate, not the constructor: protect may be any collection of names.
        options = WriterOptions.model_validate({
            "strategy": strategy, "keep_last": keep_last, "mode": mode,
            "keep_every": keep_every, "max_pending": max_pending,
            "on_backlog": on_backlog, "fsync": fsync, "on_error": on_error,
            "protect": protect, "executor": executor,
            "storage_options": {} if storage_options is None else storage_options,
        })
        self._options = options
        self._executor, self._location = make_executor(checkpoint_dir, storage, options)
        self._steps = EpisodeGuard(self._location)
        self._state = _State.NEW
        self._error: WriterFailedError | None = None
        self._queued: deque[Job] = deque()
        self._in_flight: Job | None = None
        self._in_flight_since = 0.0
        self._warned_starved = False
        self._c = Counters()
        self._stack: AsyncExitStack | None = None
        self._send: MemoryObjectSendStream[Job] | None = None
        self._done: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._waiting: anyio.CancelScope | None = None

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
            self._steps.opened(await self._executor.open())
        except BaseException:
            # Cancelled while opening: the open may have completed (lock taken) anyway.
            with anyio.CancelScope(shield=True):
                await self._executor.aclose()
            raise
        send, recv = anyio.create_memory_object_stream[Job](self._options.max_pending)
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

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        await self._close(exc)
        if exc is None:
            self._raise_if_failed()
        return None

    async def aclose(self) -> None:
        """Drain the queue, stop the writer and release the directory lock.

        Raises:
            WriterFailedError: a checkpoint failed and was not reported yet.
        """
        await self._close(None)
        self._raise_if_failed()

    async def _close(self, exc: BaseException | None) -> None:
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        assert self._send is not None
        assert self._stack is not None
        assert self._done is not None
        assert self._tg is not None
        self._send.close()
        # Nothing more to copy ahead for: what is queued is written now.
        self._executor.stop_preparing()
        if self._waiting is not None:
            self._waiting.cancel()
        # Drain on normal exit and on an ordinary exception from the body, so progress
        # made before a crash in the training code is still saved. Cancellation skips it
        # (asyncio's task.cancel() too, mid-drain); the writer still stops before this.
        cut: BaseException | None = None
        try:
            if exc is None or isinstance(exc, Exception):
                with anyio.CancelScope(shield=True):
                    await self._done.wait()
            else:
                self._tg.cancel_scope.cancel()
        except BaseException as cancelled:
            self._tg.cancel_scope.cancel()
            cut = cancelled
        try:
            # The body's exception is not passed in: the task group would wrap it in an
            # ExceptionGroup, and the caller should see its own exception unchanged.
            await self._stack.__aexit__(None, None, None)
        finally:
            self._state = _State.CLOSED
        if cut is not None:
            raise cut

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

    async def submit(
        self, snapshot: Snapshot | CapturedSnapshot, *, replace: bool = False,
        started_at: float | None = None,
    ) -> CheckpointHandle:
        """Capture ``snapshot`` and queue it; return as soon as it is queued.

        Args:
            snapshot: the state to save (captured here unless already captured).
            replace: write it even if its episode is already there (it is replaced), not
                written yet, or below the newest there (``latest`` then names it).
            started_at: a :func:`time.perf_counter` reading from when the caller began
                paying for this checkpoint; the loop time (``stats``, the result's
                ``loop_seconds``) is counted from it. A wrapper that captures and hops
                threads before calling (the sync writer) passes its own start; default:
                when ``submit`` is called.

        Returns:
            a handle; ``await handle.wait()`` for durability.

        Raises:
            WriterFailedError: an earlier checkpoint failed (``on_error="raise"``).
            WriterClosedError: the writer is not open.
            CheckpointExistsError: the episode is there or below the newest (``replace``).
            CheckpointError: the snapshot cannot be captured.

        Cancellation:
            Under ``block``, cancelling a waiting submit queues nothing.
        """
        t0 = time.perf_counter()
        self._check_open()
        if self._in_flight is not None and self._executor.kind == "thread" and \
                not self._warned_starved and t0 - self._in_flight_since > _STARVED_SECONDS:
            self._warned_starved = True
            warn_starved(self._in_flight.snap.episode_index, t0 - self._in_flight_since)
        job = Job(snapshot.capture() if isinstance(snapshot, Snapshot) else snapshot)
        if not replace:
            self._steps.check(job.snap.episode_index,
                              [j.snap.episode_index for j in self._pending()],
                              self._executor.checkpoints)
        job.handle = handle = CheckpointHandle(job)
        assert self._send is not None
        self._c.submitted += 1
        try:
            job.enqueued_at = time.perf_counter()
            self._send.send_nowait(job)
            self._queued.append(job)
        except anyio.WouldBlock:
            if self._options.on_backlog == "coalesce" and self._queued:
                # The queued snapshot is replaced by the newer one: its handles now
                # resolve when the newer state is durable, and say they were coalesced.
                self._queued[-1].absorb(handle)
                self._c.coalesced += 1
            else:
                self._c.stalls += 1
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
                self._c.stall_seconds += job.enqueued_at - s0
        start = t0 if started_at is None else min(started_at, t0)
        handle._job.loop_seconds = dt = time.perf_counter() - start
        self._c.add_loop_time(dt)
        return handle

    def _pending(self) -> list[Job]:
        """Jobs submitted and not done: queued, then the one being written."""
        return [*self._queued, *([self._in_flight] if self._in_flight is not None else [])]

    async def flush(self) -> None:
        """Wait until everything submitted so far is durable (or has failed).

        Raises:
            WriterFailedError: a checkpoint failed (``on_error="raise"``).
        """
        self._check_open()
        for job in self._pending():
            await job.event.wait()
        self._raise_if_failed()

    @property
    def stats(self) -> WriterStats:
        """A consistent copy of the writer's counters."""
        return self._c.snapshot(pending=len(self._queued) + (self._in_flight is not None))

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        """Checkpoints the writer knows are committed, oldest first."""
        return self._executor.checkpoints()

    @property
    def best(self) -> CheckpointRecord | None:
        """The checkpoint ``best`` names: best ``val_score`` by ``mode``, ties to the newer."""
        return best_of(self._executor.checkpoints(), self._options.mode)

    # -- the writer task -------------------------------------------------------------

    async def _run(self, recv: MemoryObjectReceiveStream[Job], *,
                   task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
                   ) -> None:
        assert self._done is not None
        try:
            task_status.started()
            try:
                async with recv:
                    while (job := await self._next_job(recv)) is not None:
                        await self._write_one(job)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._executor.aclose()
        finally:
            # A cancelled writer stops with snapshots still queued: their handles fail
            # (and flush returns) instead of leaving waiters blocked forever.
            dropped = WriterClosedError("the writer was cancelled before this checkpoint "
                                        "was written")
            while self._queued:
                job = self._queued.popleft()
                self._c.failed += 1
                job.error = dropped
                job.event.set()
            self._done.set()

    async def _next_job(self, recv: MemoryObjectReceiveStream[Job]) -> Job | None:
        # Under coalesce the next snapshot is taken once the writer is ready for it (the
        # prefix copied ahead): as fresh as it can be. Not waited for when closing.
        if self._options.on_backlog == "coalesce" and self._state is _State.OPEN:
            with anyio.CancelScope() as self._waiting:
                await self._executor.ready()
        try:
            return await recv.receive()
        except anyio.EndOfStream:
            return None

    async def _write_one(self, job: Job) -> None:
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
            self._c.add_report(result, wait)
            self._steps.committed(result.episode_index)
            job.result = CheckpointResult.from_report(
                result, loop_seconds=job.loop_seconds, queue_wait_seconds=wait,
                latency_seconds=time.perf_counter() - job.snap.captured_at)
        finally:
            self._in_flight = None
            job.event.set()

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._c.failed += 1
        job.error = exc
        if isinstance(exc, WriterFailedError):
            return
        msg = f"checkpoint for episode {job.snap.episode_index} failed: {exc}"
        if self._options.on_error == "warn":
            log.warning("%s (training continues; the next checkpoint will be tried)", msg)
        elif self._error is None:
            self._error = WriterFailedError(msg)
            self._error.__cause__ = exc

