"""Comparison baselines for the overhead and freshness figures (not shipped)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio

from ckptwriter.bench import EpisodeHook, Option, Recorder, Variant
from ckptwriter.memory import MemoryLog

__all__ = ["BASELINES", "journal_process_variant", "naive_sync", "options", "thread_rewrite"]

_REPO = Path(__file__).resolve().parent.parent


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


def journal_process_variant(
    rec: Recorder, *, keep_last: int = 5, prime: bool = False
) -> Variant:
    """The process design: the loop appends the memory's new bytes to a journal file
    and writes one command line per checkpoint to a long-lived writer process
    (``benchmarks.journal_writer``), which commits with the same LocalStorage code."""

    def variant(path: Path, log: MemoryLog) -> AbstractAsyncContextManager[EpisodeHook]:
        @asynccontextmanager
        async def cm() -> AsyncIterator[EpisodeHook]:
            journal = path / "journal.jsonl"
            jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            # Started before the timed loop; a blocking Popen is what we want here.
            proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "benchmarks.journal_writer", str(journal),
                 str(path / "checkpoints"), str(keep_last)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_REPO,
            )
            assert proc.stdin is not None
            assert proc.stdout is not None
            cmd_fd, ack_fd = proc.stdin.fileno(), proc.stdout.fileno()
            os.set_blocking(ack_fd, False)
            acks = bytearray()
            sent = 0
            perf = time.perf_counter

            def drain() -> None:
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(ack_fd, 1 << 16):
                        acks.extend(chunk)

            async def hook(ep: int) -> None:
                nonlocal sent
                rec.submitted_at[ep] = perf()
                cap = log.capture()
                views = list(cap.iter_bytes(sent))
                if views:
                    os.writev(jfd, views)
                sent = cap.nbytes
                os.write(cmd_fd, f"{ep} {cap.entries} {cap.nbytes}\n".encode())
                drain()

            try:
                if prime:
                    t = perf()
                    await hook(0)
                    while b"\n" not in acks:
                        await anyio.sleep(0.001)
                        drain()
                    rec.first_write_s = perf() - t
                yield hook
            finally:
                proc.stdin.close()
                os.set_blocking(ack_fd, True)
                rest = await anyio.to_thread.run_sync(proc.stdout.read)
                acks.extend(rest)
                proc.stdout.close()
                await anyio.to_thread.run_sync(proc.wait)
                os.close(jfd)
            done = sorted(
                (int(a), float(b)) for a, b in (ln.split() for ln in acks.decode().splitlines())
            )
            i = 0
            for ep in sorted(rec.submitted_at):
                while i < len(done) and done[i][0] < ep:
                    i += 1
                if i < len(done):
                    rec.durable_at[ep] = done[i][1]
            rec.stats = {"written": len(done)}

        return cm()

    return variant


def _journal_untimed(path: Path, log: MemoryLog) -> AbstractAsyncContextManager[EpisodeHook]:
    return journal_process_variant(Recorder())(path, log)


BASELINES: dict[str, Variant] = {
    "naive sync writer (json + fsync in the loop)": naive_sync,
    "thread rewriting the whole memory": thread_rewrite,
    "prototype: writer process + journal (DESIGN.md option)": _journal_untimed,
}


def options() -> dict[str, Option]:
    """The process design, beside the thread options of :func:`ckptwriter.bench.thread_options`."""
    return {
        "process + journal, 5 ms switch (default)": (
            0.005, lambda r: journal_process_variant(r, prime=True)),
    }
