"""Where a checkpoint's blocking work runs, and the thread that runs it in this process.

Every executor runs the same :class:`~ckptwriter.commit.CommitPipeline` for one
checkpoint at a time; they differ in how they share the GIL with the training loop.

- :class:`ThreadExecutor` (here) runs it in a worker thread of this process. Every
  syscall the writer makes releases and retakes the GIL, and a loop that never really
  blocks can starve that thread (see README, "Where the writer runs").
- :class:`~ckptwriter.process_executor.ProcessExecutor` runs it in a long-lived writer
  process with its own GIL, on another core.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import anyio

from .commit import CommitPipeline, CommitReport
from .commit_files import Stage
from .errors import ConfigError
from .memory_pieces import staged_for_direct_write
from .options import WriterOptions
from .process_executor import ProcessExecutor
from .retention import CheckpointRecord
from .snapshot import CapturedSnapshot
from .storage import Backend, LocalStorage, open_backend, parse_location

__all__ = ["Executor", "ThreadExecutor", "make_executor"]


class Executor(Protocol):
    """Runs a commit pipeline somewhere off the event loop."""

    kind: str

    async def open(self) -> list[CheckpointRecord]:
        """Open the checkpoints location; the checkpoints committed there already."""
        ...

    async def persist(self, snap: CapturedSnapshot) -> CommitReport:
        """Commit one snapshot (durable when this returns)."""
        ...

    async def ready(self) -> None:
        """Return once the next commit's memory prefix is copied ahead, or at once if
        there is nothing to copy; cancelling the wait loses nothing."""
        ...

    def stop_preparing(self) -> None:
        """The writer is closing: stop copying ahead as soon as possible."""
        ...

    async def aclose(self) -> None:
        """Release the location; never loses an acknowledged checkpoint."""
        ...

    def checkpoints(self) -> list[CheckpointRecord]:
        """The checkpoints committed in the location, oldest first."""
        ...


class ThreadExecutor:
    """One worker-thread hop per checkpoint."""

    kind = "thread"

    def __init__(self, pipeline: CommitPipeline) -> None:
        self._p = pipeline
        self._limiter: anyio.CapacityLimiter | None = None
        # Copying ahead runs only when the writer waits for it (coalesce): in this
        # process it would take the GIL from the loop at no gain otherwise.
        self._stop = threading.Event()

    async def open(self) -> list[CheckpointRecord]:
        # Our own limiter (made here: it needs a running event loop): an application that
        # fills anyio's shared default of 40 threads must not delay its checkpoints.
        self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._p.open, limiter=self._limiter)

    async def persist(self, snap: CapturedSnapshot) -> CommitReport:
        return await anyio.to_thread.run_sync(self._p.persist, snap, limiter=self._limiter)

    async def ready(self) -> None:
        # A cancelled hop still waits for the thread: stop_preparing() cuts it short.
        if self._p.can_prepare:
            await anyio.to_thread.run_sync(self._p.prepare, self._stop.is_set,
                                           limiter=self._limiter)

    def stop_preparing(self) -> None:
        self._stop.set()

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._p.close, limiter=self._limiter)

    def checkpoints(self) -> list[CheckpointRecord]:
        return sorted(self._p.committed, key=lambda r: r.episode_index)


def make_executor(
    checkpoint_dir: str | Path | None, storage: Backend | None, options: WriterOptions
) -> tuple[Executor, str]:
    """Where the blocking work runs, and the location checkpoints go to.

    ``auto`` picks the writer process for any location another process can open (a
    local directory, an object store) on POSIX; a storage object or an in-process store
    (``memory://``) stays on a worker thread.
    """
    if storage is not None:
        if options.storage_options:
            raise ConfigError(
                "storage_options apply to a checkpoint_dir URL, but a storage object was "
                "given; configure the storage object itself, or pass checkpoint_dir instead"
            )
        if options.executor == "process":
            raise ConfigError(
                "executor='process' needs a local checkpoint_dir or an object-storage URL "
                "(the writer process opens the location itself), not a storage object; "
                "pass checkpoint_dir, or use executor='thread'"
            )
        return ThreadExecutor(CommitPipeline(storage, options.policy, options.protect,
                                             mode=options.mode, stage=_stage_for(storage))), \
            storage.location
    if checkpoint_dir is None:
        raise ConfigError("CheckpointWriter needs checkpoint_dir or storage")
    loc = parse_location(checkpoint_dir).absolute()
    location = loc.path
    if options.executor == "process" and not loc.shared_across_processes:
        raise ConfigError(
            f"executor='process' cannot write to {loc.text}: a {loc.scheme}:// store lives "
            "inside this process, so the writer process would see another one; use "
            "executor='thread'"
        )
    if options.executor == "process" or (
        options.executor == "auto" and loc.shared_across_processes and os.name == "posix"
    ):
        return ProcessExecutor(location, options), location
    backend = open_backend(location, fsync=options.fsync,
                           storage_options=dict(options.storage_options))
    return ThreadExecutor(CommitPipeline(backend, options.policy, options.protect,
                                         mode=options.mode, stage=_stage_for(backend))), \
        backend.location


def _stage_for(backend: Backend) -> Stage | None:
    # A local directory with fsync on writes a large full write past the page cache
    # from aligned buffers, as the writer process does; elsewhere there is none to skip.
    if isinstance(backend, LocalStorage) and backend.fsync and hasattr(os, "O_DIRECT"):
        return staged_for_direct_write
    return None
