"""Comparison baselines for the overhead and freshness figures (not shipped)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio

from ckptwriter import MemoryLog

from .loop import EpisodeHook, Variant

__all__ = ["BASELINES", "naive_sync", "thread_rewrite"]


def _dump_all(log: MemoryLog, upto: int) -> bytes:
    # What a writer without encode-on-append does: every entry, every time, with json.
    return "".join(
        json.dumps(e.model_dump(), separators=(",", ":")) + "\n" for e in log[:upto]
    ).encode()


def _replace_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def naive_sync(path: Path, log: MemoryLog) -> AbstractAsyncContextManager[EpisodeHook]:
    """json-encode the whole memory and write + fsync it in the loop, every episode."""

    @asynccontextmanager
    async def cm() -> AsyncIterator[EpisodeHook]:
        async def hook(ep: int) -> None:
            _replace_durably(path / "memory.jsonl", _dump_all(log, len(log)))

        yield hook

    return cm()


def thread_rewrite(path: Path, log: MemoryLog) -> AbstractAsyncContextManager[EpisodeHook]:
    """A writer thread that re-encodes and rewrites the whole memory for each checkpoint
    (coalescing to the newest request, so it never falls behind by more than one)."""

    @asynccontextmanager
    async def cm() -> AsyncIterator[EpisodeHook]:
        wanted = threading.Event()
        state = {"n": 0, "stop": False}

        def work() -> None:
            while True:
                wanted.wait()
                wanted.clear()
                if state["stop"]:
                    return
                _replace_durably(path / "memory.jsonl", _dump_all(log, state["n"]))

        t = threading.Thread(target=work, name="bench-rewrite", daemon=True)
        t.start()

        async def hook(ep: int) -> None:
            state["n"] = len(log)
            wanted.set()

        try:
            yield hook
        finally:
            state["stop"] = True
            wanted.set()
            await anyio.to_thread.run_sync(t.join)

    return cm()


BASELINES: dict[str, Variant] = {
    "naive sync writer (json + fsync in the loop)": naive_sync,
    "thread rewriting the whole memory": thread_rewrite,
}
