"""Work the local backend takes off a commit's critical path, or batches.

Two kinds, both measured on ext4 (``benchmarks/floor.py``, docs/PERFORMANCE.md):

- :class:`FsyncBatch`: the fsyncs of one pending checkpoint's files, its temp directory
  and the next ``latest.json``, deferred until all are written (but for files past the
  16th, flushed as written); the checkpoint is renamed into place only when every one
  of them has succeeded.
- :class:`Reaper`: a checkpoint retention deletes vanishes for readers in one rename,
  in the commit; unlinking its files (freeing an 11 MB file's extents costs ext4 3 to
  14 ms) runs here, beside the next commit. Its failures are kept for the pipeline to
  report, and a commit that runs out of space waits for it and tries once more.

Both only ever touch what the backend hands them: descriptors it opened, and trash
entries of the locked directory, removed through its descriptor.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Callable

__all__ = ["FsyncBatch", "Reaper"]

# Descriptors a batch holds open at most: a state of 10,000 keys never holds 10,000.
_HELD = 16


def _sync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsyncBatch:
    """fsync-then-close of one checkpoint's descriptors, all at :meth:`wait`, which
    raises the first failure. ``enabled`` False: nothing is fsynced (``fsync=False``).

    Deferred, not one by one as each file is written: the small files written after the
    memory file (``runtime.json``, the staged ``latest.json``) then need no journal
    commit of their own before the memory file's fsync, and the memory file's writeback,
    started as it was filled, goes on while they are written. (Flushing them on threads,
    concurrently, measured the same within 0.2 ms here: not worth the threads.)
    """

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._held: collections.deque[int] = collections.deque()
        self._error: BaseException | None = None

    def add(self, fd: int) -> None:
        """fsync ``fd`` at :meth:`wait`, then close it; the batch owns it from now on.

        Past :data:`_HELD` descriptors, this one is flushed now: the newest, so the first
        (the memory file, whose writeback is under way) still waits for :meth:`wait`.
        """
        if not self._enabled:
            os.close(fd)
            return
        if len(self._held) >= _HELD:
            self._flush(fd)
        else:
            self._held.append(fd)

    def _flush(self, fd: int) -> None:
        try:
            _sync_close(fd)
        except OSError as exc:
            if self._error is None:
                self._error = exc

    def wait(self) -> None:
        """Every descriptor flushed (in the order added) and closed.

        Raises:
            OSError: the first fsync that failed (ENOSPC, EIO...): the bytes are not
                durable, and the checkpoint must not appear.
        """
        while self._held:
            self._flush(self._held.popleft())
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def abandon(self) -> None:
        """Every descriptor closed, failures ignored (the checkpoint is discarded)."""
        while self._held:
            os.close(self._held.popleft())
        self._error = None


class Reaper:
    """Removes trashed checkpoints, in order, on one thread started on first use.

    Args:
        remove: removes one trash entry (and its tree) of the locked directory.
    """

    def __init__(self, remove: Callable[[str], None]) -> None:
        self._remove = remove
        self._reset()
        _REAPERS.add(self)

    def _reset(self) -> None:
        # Also in a forked child, where the thread is gone and the condition's lock may
        # have been held by it: the removals are the parent's (its writer holds the lock).
        self._todo: collections.deque[str] = collections.deque()
        self._failed: list[tuple[str, BaseException]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._closing = False
        # Removals finished, and how many the last settle() had seen: space freed since.
        self._finished = 0
        self._seen = 0

    def _ensure_thread(self) -> None:
        """A thread to work through the list (called with the condition held)."""
        if self._closing:
            return  # stop() owns the thread until it has joined it
        if self._todo and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._run, name="ckptwriter-reaper",
                                            daemon=True)
            self._thread.start()

    def submit(self, trash: str) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the reaper is stopped")
            self._todo.append(trash)
            self._ensure_thread()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._closing:
                    self._cond.wait()
                if not self._todo:
                    return
                trash = self._todo[0]
                self._busy = True
            failure: BaseException | None = None
            try:
                self._remove(trash)
            except BaseException as exc:  # kept for settle(); the thread goes on
                failure = exc
            with self._cond:
                if failure is not None:
                    self._failed.append((trash, failure))
                self._todo.popleft()
                self._busy = False
                self._finished += 1
                self._cond.notify_all()

    def settle(self, *, wait: bool) -> tuple[bool, list[tuple[str, BaseException]]]:
        """Whether removals may have freed space since the last call (one finished since,
        even a failed one, which may have removed part of its tree; or one still under
        way: then, with ``wait``, waited for), and those that failed since."""
        with self._cond:
            progressed = bool(self._todo) or self._busy or self._finished != self._seen
            if wait:
                while self._todo or self._busy:
                    self._ensure_thread()  # never wait on a thread that is gone
                    self._cond.wait(timeout=1.0)
            self._seen = self._finished
            failed, self._failed = self._failed, []
        return progressed, failed

    def stop(self) -> list[tuple[str, BaseException]]:
        """Finish every removal, then end the thread; the failures not yet taken."""
        _, failed = self.settle(wait=True)
        with self._cond:
            self._closing = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            self._thread = None
            self._closing = False
            failed += self._failed
            self._failed = []
        return failed


_REAPERS: weakref.WeakSet[Reaper] = weakref.WeakSet()


def _forget_in_forked_child() -> None:
    for reaper in list(_REAPERS):
        reaper._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_forked_child)
