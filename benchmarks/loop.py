"""The CPU-bound training loop the benchmarks time, and the variants it runs with.

A variant is the checkpointing a loop does: none (:func:`checkpointing_off`), a
:class:`ckptwriter.CheckpointWriter` (:func:`ckptwriter_variant`), or a baseline
(``baselines.py``). Each gives the loop a per-episode hook.
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

from ckptwriter import CheckpointHandle, CheckpointWriter, MemoryLog, Snapshot, switch_interval

from .sizes import BenchConfig
from .workload import Entry, burn_cpu, fill_memory, scratch

__all__ = [
    "DEFAULT_SWITCH_INTERVAL",
    "LOWERED_SWITCH_INTERVAL",
    "EpisodeHook",
    "LoopRun",
    "Recorder",
    "Variant",
    "checkpointing_off",
    "ckptwriter_variant",
    "cpu_loop",
    "ms",
    "run_loop",
]

# The interval our runtime sets (writer.switch_interval's default); 5 ms is CPython's.
LOWERED_SWITCH_INTERVAL = 0.0005
DEFAULT_SWITCH_INTERVAL = 0.005

EpisodeHook = Callable[[int], Awaitable[None]]
# A variant of the training loop: given a scratch directory and the live memory log,
# an async context manager yielding the per-episode hook (None: checkpointing off).
Variant = Callable[[Path, MemoryLog], AbstractAsyncContextManager[EpisodeHook | None]]


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded for a table."""
    return round(seconds * 1e3, 4)


@dataclass
class LoopRun:
    """Timings of one run of :func:`cpu_loop`.

    ``marks[i]`` is the time from the first episode's start to the end of episode
    ``i + 1``; ``total_s`` also includes leaving the variant (draining the last
    checkpoint), not entering it.
    """

    total_s: float
    marks: list[float]
    hook_s: list[float]
    loop_cpu_s: float = 0.0
    cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


async def cpu_loop(
    episodes: int,
    log: MemoryLog,
    pool: Sequence[Entry],
    burn_n: int,
    hook_cm: AbstractAsyncContextManager[EpisodeHook | None],
    *,
    entries_per_episode: int = 4,
    budget_s: float | None = None,
) -> LoopRun:
    """A synthetic training loop that never really blocks: CPU, append, hook, sleep(0).

    Stops early once ``budget_s`` seconds have passed (for the quadratic baselines).
    """
    marks: list[float] = []
    hook_s: list[float] = []
    k = len(pool)
    pos = len(log) % k
    perf = time.perf_counter
    t0 = perf()
    async with hook_cm as hook:
        # Setting up (a writer's open, a priming checkpoint) is not part of the run;
        # leaving the block (draining the last checkpoint) is.
        t0 = perf()
        c0 = time.thread_time()
        for ep in range(1, episodes + 1):
            burn_cpu(burn_n)
            for _ in range(entries_per_episode):
                log.append(pool[pos])
                pos = (pos + 1) % k
            if hook is not None:
                h0 = perf()
                await hook(ep)
                hook_s.append(perf() - h0)
            # The loop the targets describe awaits exactly sleep(0), never a real wait.
            await anyio.sleep(0)  # noqa: ASYNC115
            now = perf() - t0
            marks.append(now)
            if budget_s is not None and now > budget_s:
                break
    return LoopRun(total_s=perf() - t0, marks=marks, hook_s=hook_s,
                   loop_cpu_s=time.thread_time() - c0)


def checkpointing_off(_dir: Path, _log: MemoryLog) -> AbstractAsyncContextManager[None]:
    """The reference variant: the same loop without any checkpointing."""

    @asynccontextmanager
    async def cm() -> AsyncIterator[None]:
        yield None

    return cm()


class Recorder:
    """When each submit happened and when its state became durable (freshness)."""

    def __init__(self) -> None:
        self.submitted_at: dict[int, float] = {}
        self.durable_at: dict[int, float] = {}
        self.first_write_s = 0.0
        self.stats: dict[str, Any] = {}

    def freshness(self, skip: int = 0) -> list[float]:
        """Submit-to-durable seconds per submit (a coalesced one: until the newer
        snapshot that replaced it was durable), leaving out episodes < ``skip``."""
        return [
            self.durable_at[ep] - t for ep, t in sorted(self.submitted_at.items())
            if ep >= skip and ep in self.durable_at
        ]


def ckptwriter_variant(
    rec: Recorder,
    *,
    keep_last: int | None = 5,
    on_backlog: Literal["block", "coalesce"] = "coalesce",
    max_pending: int = 1,
    executor: Literal["auto", "thread", "process"] = "auto",
    prime: bool = False,
    agent_type: str = "BenchAgent",
) -> Variant:
    """Checkpoint every episode with :class:`CheckpointWriter` (``auto``: the writer
    process for a local directory, as users get it)."""

    def variant(path: Path, log: MemoryLog) -> AbstractAsyncContextManager[EpisodeHook]:
        @asynccontextmanager
        async def cm() -> AsyncIterator[EpisodeHook]:
            strategy: Literal["all", "last_n"] = "last_n" if keep_last else "all"
            async with CheckpointWriter(
                path / "checkpoints", strategy=strategy, keep_last=keep_last,
                on_backlog=on_backlog, max_pending=max_pending, executor=executor,
            ) as writer:
                perf = time.perf_counter
                handles: list[CheckpointHandle] = []

                async def hook(ep: int) -> None:
                    rec.submitted_at[ep] = perf()
                    handles.append(await writer.submit(
                        Snapshot(episode_index=ep, train_steps_total=ep * 4,
                                 agent_type=agent_type, memory=log)
                    ))

                if prime:
                    # One full checkpoint before the timed episodes: the steady state.
                    await hook(0)
                    rec.first_write_s = (await handles[0].wait()).latency_seconds
                yield hook
            # Every handle is resolved once the writer has drained. A result's
            # latency runs from its own capture, which is right after its submit began.
            results = [await h.wait() for h in handles]
            for h, r in zip(handles, results, strict=True):
                done = rec.submitted_at[r.episode_index] + r.latency_seconds
                rec.durable_at[h.episode_index] = done
            s = writer.stats
            rec.stats = {
                "submitted": s.submitted, "written": s.written, "coalesced": s.coalesced,
                "stalls": s.stalls, "bytes_written": s.bytes_written,
                "bytes_serialized": s.bytes_serialized,
                "entries_serialized": s.entries_serialized, "deleted": s.deleted,
            }

        return cm()

    return variant


def run_loop(
    cfg: BenchConfig,
    base: Path,
    variant: Variant,
    *,
    memory: int,
    episodes: int,
    pool: Sequence[Entry],
    burn_n: int,
    interval: float,
    budget_s: float | None = None,
) -> LoopRun:
    """One run of the CPU-bound loop in a fresh event loop and a fresh scratch dir."""
    log = fill_memory(memory, pool)
    with scratch(base, "loop") as path:
        gc.collect()
        # CPU of this process (loop + any writer thread) and of waited-for children
        # (the writer process, reaped when the writer closes).
        before = _cpu_seconds()
        with switch_interval(interval):
            run = anyio.run(
                lambda: cpu_loop(
                    episodes, log, pool, burn_n, variant(path, log),
                    entries_per_episode=cfg.entries_per_episode, budget_s=budget_s,
                )
            )
        run.cpu_s = _cpu_seconds() - before
        return run


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
