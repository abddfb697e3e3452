"""The writer for a synchronous training loop.

The async :class:`CheckpointWriter` runs on its own event loop in a background thread
(an anyio blocking portal). ``submit`` captures the snapshot in the caller's thread, so
isolation is the same as in the async writer, then hands the frozen capture over.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Collection, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

from .errors import CheckpointError, WriterClosedError
from .handles import CheckpointHandle, CheckpointResult
from .options import DEFAULTS, ExecutorKind, OnBacklog, OnError
from .retention import CheckpointRecord, Mode, Strategy
from .snapshot import CapturedSnapshot, Snapshot
from .stats import WriterStats
from .storage import Backend
from .writer import CheckpointWriter

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

__all__ = ["SyncCheckpointHandle", "SyncCheckpointWriter"]

log = logging.getLogger("ckptwriter")


class _PortalThread:
    """An event loop in a daemon thread, reached through a blocking portal.

    What anyio's ``start_blocking_portal`` does, without its generator: a fork of this
    process that drops the writer must have nothing to finalize, and that generator's
    finalizer would wait forever for a thread the fork does not have.
    """

    def __init__(self) -> None:
        self._ready: Future[BlockingPortal] = Future()
        # A context of its own, as anyio gives its portal: where threads inherit the
        # caller's (3.14+ free-threaded builds), the loop must not run in the caller's.
        extra: dict[str, Any] = {"context": contextvars.Context()} \
            if sys.version_info >= (3, 14) else {}
        self._thread = threading.Thread(target=self._run, name="ckptwriter-portal",
                                        daemon=True, **extra)
        self._thread.start()
        self.portal = self._ready.result()

    def _run(self) -> None:
        try:
            anyio.run(self._serve)
        except BaseException as exc:  # handed to the opener, raised there
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._ready.set_result(portal)
            await portal.sleep_until_stopped()

    def stop(self, *, cancel_remaining: bool = False) -> None:
        """Stop the loop (its tasks finish, or are cancelled) and wait for the thread."""
        try:
            self.portal.call(self.portal.stop, cancel_remaining)
        except RuntimeError:
            pass  # stopped already
        self._thread.join()


def _forked_error(what: str, pid: int) -> WriterClosedError:
    return WriterClosedError(
        f"this {what} belongs to process {pid}, and this is a fork of it "
        f"(process {os.getpid()}): the writer's thread and event loop run only there; "
        "open a new SyncCheckpointWriter in this process (on another checkpoint_dir) if "
        "it must write checkpoints"
    )


class SyncCheckpointHandle:
    """Blocking twin of :class:`CheckpointHandle`."""

    __slots__ = ("_handle", "_pid", "_portal")

    def __init__(self, handle: CheckpointHandle, portal: BlockingPortal, pid: int) -> None:
        self._handle = handle
        self._portal = portal
        self._pid = pid

    @property
    def episode_index(self) -> int:
        """Episode of the submitted snapshot."""
        return self._handle.episode_index

    @property
    def coalesced(self) -> bool:
        """True if a newer snapshot replaced this one before it was written."""
        return self._handle.coalesced

    def done(self) -> bool:
        """True once durable or failed."""
        return self._handle.done()

    def wait(self) -> CheckpointResult:
        """Block until durable. Raises WriterFailedError if it could not be written."""
        if self._handle.done():
            # Also after the writer closed, when its event loop is gone.
            return self._handle.result()
        if os.getpid() != self._pid:
            # The portal's thread was not forked: a call would wait for it forever.
            raise _forked_error("checkpoint handle", self._pid)
        return self._portal.call(self._handle.wait)


class SyncCheckpointWriter:
    """:class:`CheckpointWriter` for synchronous code; same arguments, used with ``with``.

    Args:
        checkpoint_dir, strategy, keep_last, mode, keep_every, max_pending, on_backlog,
        fsync, on_error,
        protect, storage, executor, storage_options: as for :class:`CheckpointWriter`,
        with the same defaults (:class:`~ckptwriter.options.WriterOptions`' own).

    Raises:
        ConfigError: an invalid option or strategy/keep_last combination.

    Example::

        with SyncCheckpointWriter("checkpoints", keep_last=5) as writer:
            for ep in range(1, 101):
                ...
                writer.submit(Snapshot(ep, steps, "MyAgent", memory))
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
        self._writer = CheckpointWriter(
            checkpoint_dir, strategy=strategy, keep_last=keep_last, mode=mode,
            keep_every=keep_every, max_pending=max_pending,
            on_backlog=on_backlog, fsync=fsync, on_error=on_error, protect=protect,
            storage=storage, executor=executor, storage_options=storage_options,
        )
        self._loop: _PortalThread | None = None
        self._writer_cm: AbstractContextManager[CheckpointWriter] | None = None
        # The process that opened it: a fork of that process (os.fork, a fork-started
        # worker) has no copy of the portal's thread, and must never wait for it.
        self._pid = os.getpid()

    def __enter__(self) -> Self:
        if self._loop is not None:
            raise WriterClosedError("SyncCheckpointWriter is already open")
        loop = _PortalThread()
        portal = loop.portal
        # One portal task enters and exits the writer: anyio cancel scopes must be exited
        # by the task that entered them.
        writer_cm = portal.wrap_async_context_manager(self._writer)
        try:
            writer_cm.__enter__()
        except BaseException:
            loop.stop(cancel_remaining=True)
            raise
        self._loop, self._writer_cm = loop, writer_cm
        self._pid = os.getpid()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = self._loop
        if loop is None:
            return
        if os.getpid() != self._pid:
            # A fork leaving the block (sys.exit, an exception): the writer is the
            # parent's, which drains and closes it; here there is nothing to wait for.
            self._loop = self._writer_cm = None
            return
        self._loop = None
        writer_cm, self._writer_cm = self._writer_cm, None
        assert writer_cm is not None
        try:
            if isinstance(exc, BaseException) and not isinstance(exc, Exception):
                # Ctrl-C: still save what is queued, but the interrupt is what the caller
                # must see, not a failure of that last save.
                try:
                    writer_cm.__exit__(None, None, None)
                except CheckpointError as failed:
                    log.warning("checkpoints queued at interrupt were not saved: %s", failed)
            else:
                writer_cm.__exit__(exc_type, exc, tb)
        finally:
            loop.stop()

    def close(self) -> None:
        """Drain and stop; raises WriterFailedError if a checkpoint failed."""
        self.__exit__(None, None, None)

    def _require(self) -> BlockingPortal:
        if self._loop is None:
            raise WriterClosedError(
                "SyncCheckpointWriter is not open: use `with SyncCheckpointWriter(...) as w:`"
            )
        if os.getpid() != self._pid:
            raise _forked_error("SyncCheckpointWriter", self._pid)
        return self._loop.portal

    def submit(self, snapshot: Snapshot | CapturedSnapshot, *,
               replace: bool = False) -> SyncCheckpointHandle:
        """Capture and queue a snapshot; see :meth:`CheckpointWriter.submit`.

        ``stats`` counts the loop time from here, capture and thread hop included.

        Raises:
            CheckpointExistsError: the episode is already in the directory, not written
                yet, or below the newest there; pass ``replace=True`` to write it anyway.
        """
        portal = self._require()
        t0 = time.perf_counter()
        captured = snapshot.capture() if isinstance(snapshot, Snapshot) else snapshot
        # The writer counts from t0, so its stats include this capture and the hop to
        # its thread (everything but the return hop, which nothing can count there).
        handle = portal.call(partial(self._writer.submit, captured, replace=replace,
                                     started_at=t0))
        return SyncCheckpointHandle(handle, portal, self._pid)

    def flush(self) -> None:
        """Block until everything submitted is durable."""
        self._require().call(self._writer.flush)

    @property
    def stats(self) -> WriterStats:
        """See :attr:`CheckpointWriter.stats`."""
        return self._writer.stats

    @property
    def location(self) -> str:
        """Where checkpoints go."""
        return self._writer.location

    @property
    def executor(self) -> str:
        """``"process"`` or ``"thread"``: where the blocking work runs."""
        return self._writer.executor

    @property
    def checkpoints(self) -> list[CheckpointRecord]:
        """Checkpoints the writer knows are committed, oldest first."""
        return self._writer.checkpoints

    @property
    def best(self) -> CheckpointRecord | None:
        """See :attr:`CheckpointWriter.best`."""
        return self._writer.best
