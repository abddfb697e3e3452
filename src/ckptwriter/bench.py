"""Measure what checkpointing costs a training loop, on this machine and this disk.

Shared by ``ckptwriter bench`` (a user measures their own disk and settings) and the
repository's suite (``python -m benchmarks``, which adds comparison baselines). Every
figure is a median over repeats, and every ratio is measured side by side in one run,
so the noise of a shared machine hits both sides of it alike.

The figures follow the performance targets (issue 4):

1. ``submit()`` stall: p99 <= 1 ms, and p99 at a large memory within 1.5x of a small one.
2. Overhead of checkpointing every episode of a CPU-bound loop: <= 3 %.
3. Freshness (submit to durable) p99 <= 100 ms under that loop, large memory.
4. A full write of a 1 GiB memory >= 80 % of raw write+fsync throughput.
5. Incremental scaling (~1.0x the final memory serialized) and encoding >= 200 MB/s.
6. Retention + ``latest`` pointer add <= 1 ms to the loop and nothing to the stall.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import anyio

from .layout import checkpoint_name
from .memory import Action, AnyEntry, Feedback, FeedbackContent, MemoryLog, Observation, Reflection
from .snapshot import Snapshot
from .writer import CheckpointHandle, CheckpointResult, CheckpointWriter, switch_interval

__all__ = [
    "SIZES",
    "BenchConfig",
    "Figure",
    "LoopRun",
    "Report",
    "Variant",
    "burn_cpu",
    "calibrate_burn",
    "cpu_loop",
    "machine_info",
    "main",
    "run_suite",
]

# The interval our runtime sets (writer.switch_interval's default); 5 ms is CPython's.
LOWERED_SWITCH_INTERVAL = 0.0005
DEFAULT_SWITCH_INTERVAL = 0.005

EpisodeHook = Callable[[int], Awaitable[None]]
# A variant of the training loop: given a scratch directory and the live memory log,
# an async context manager yielding the per-episode hook (None: checkpointing off).
Variant = Callable[[Path, MemoryLog], AbstractAsyncContextManager[EpisodeHook | None]]


# -- sizes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """How big each benchmark is. ``SIZES`` holds the presets.

    Attributes:
        repeats: runs per measured variant; figures are medians over them.
        loop_repeats: repeats of the overhead and stall runs: their targets (3 %, a
            ratio of two p99s below 1 ms) need more samples on a shared machine.
        episodes: episodes of the CPU-bound overhead run (target 2).
        episode_cpu_s: pure-Python CPU per episode.
        entries_per_episode: memory entries appended per episode.
        keep_last: ``last_n`` retention of the loop runs.
        stall_episodes: episodes of each stall/freshness run (targets 1, 3).
        small_memory: entries in memory for the "small" side of target 1.
        large_memory: entries in memory for the "large" side of targets 1 and 3.
        baseline_budget_s: wall-time cap of one naive baseline run (they are quadratic).
        gib_bytes: memory size of the full-write throughput run (target 4).
        incr_entries: final memory of the incremental-scaling run (target 5).
        incr_every: entries between checkpoints of that run.
        encode_entries: entries encoded by the serializer throughput run.
    """

    repeats: int = 3
    loop_repeats: int = 5
    episodes: int = 5000
    episode_cpu_s: float = 0.001
    entries_per_episode: int = 4
    keep_last: int = 5
    stall_episodes: int = 2000
    small_memory: int = 1_000
    large_memory: int = 1_000_000
    baseline_budget_s: float = 8.0
    gib_bytes: int = 1 << 30
    incr_entries: int = 1_000_000
    incr_every: int = 1_000
    encode_entries: int = 400_000


SIZES: dict[str, BenchConfig] = {
    "full": BenchConfig(),
    "quick": BenchConfig(
        repeats=3, loop_repeats=3, episodes=1500, stall_episodes=800, large_memory=200_000,
        baseline_budget_s=3.0, gib_bytes=256 << 20, incr_entries=200_000,
        incr_every=1_000, encode_entries=200_000,
    ),
    # Seconds in total: for the smoke test, which checks structure, never targets.
    "tiny": BenchConfig(
        repeats=1, loop_repeats=1, episodes=40, episode_cpu_s=0.0002, stall_episodes=30,
        small_memory=100, large_memory=2_000, baseline_budget_s=0.3, gib_bytes=2 << 20,
        incr_entries=3_000, incr_every=1_000, encode_entries=5_000,
    ),
}


# -- results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured figure, its target and whether it was met (``None``: informative)."""

    id: str
    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        """``PASS``, ``MISS`` or ``info``."""
        return "info" if self.passed is None else ("PASS" if self.passed else "MISS")


@dataclass
class Report:
    """A whole run: the machine, the sizes, the figures and the raw samples."""

    machine: dict[str, Any]
    config: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Everything as plain JSON types."""
        return {
            "started": self.started,
            "seconds": round(self.seconds, 2),
            "machine": self.machine,
            "config": self.config,
            "figures": [{**asdict(f), "verdict": f.verdict} for f in self.figures],
            "raw": self.raw,
            "errors": self.errors,
        }


# -- the machine ---------------------------------------------------------------------


def filesystem_of(path: str | os.PathLike[str]) -> dict[str, str]:
    """The mount holding ``path`` (longest matching mount point in /proc/mounts)."""
    real = os.path.realpath(path)
    best = {"mount_point": "?", "fs_type": "unknown", "device": "?"}
    best_len = -1
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                dev, mnt, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > best_len:
                    best = {"mount_point": mnt, "fs_type": fstype, "device": dev}
                    best_len = len(mnt)
    except OSError:
        pass
    return best


def machine_info(target_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Cores, Python, kernel, filesystem of ``target_dir`` and the load right now."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "target_dir": str(Path(target_dir).resolve()),
        **filesystem_of(target_dir),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- helpers -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` (0..100) percentile, nearest-rank; 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    """Median; 0.0 for no values."""
    return statistics.median(values) if values else 0.0


def entry_pool(n: int = 4096) -> list[AnyEntry]:
    """Distinct entries in the 4-per-episode pattern, cycled to build large memories.

    Sizes are those of a text agent: a 160-character observation, a short action, a
    scored feedback and a one-sentence reflection (about 125 bytes per JSON line).
    """
    pool: list[AnyEntry] = []
    for i in range(max(1, n // 4)):
        pool.append(Observation(content=f"step {i}: " + "the room has a door, a key, a lamp "
                                "and a locked chest; the agent holds nothing yet. " * 2))
        pool.append(Action(content=f"pick up the key and try the chest #{i}"))
        pool.append(Feedback(content=FeedbackContent(score=(i % 10) / 10,
                                                     message=f"chest opened on try {i}")))
        pool.append(Reflection(content=f"keys open chests; try the nearest lock first ({i})"))
    return pool


def fill_memory(n_entries: int, pool: Sequence[AnyEntry]) -> MemoryLog:
    """A log of ``n_entries`` entries cycled from ``pool``."""
    log = MemoryLog()
    full, rest = divmod(n_entries, len(pool))
    for _ in range(full):
        log.extend(pool)
    log.extend(pool[:rest])
    return log


def burn_cpu(n: int) -> int:
    # Pure-Python arithmetic: holds the GIL the whole time, like an agent's step logic.
    x = 0
    for i in range(n):
        x += i * i % 7
    return x


def calibrate_burn(seconds: float) -> int:
    """Iterations of the burn loop that take ``seconds`` of CPU here (median of 5)."""
    n = 20_000
    while True:
        t = time.perf_counter()
        burn_cpu(n)
        dt = time.perf_counter() - t
        if dt > 0.02:
            break
        n *= 2
    per_iter = []
    for _ in range(5):
        t = time.perf_counter()
        burn_cpu(n)
        per_iter.append((time.perf_counter() - t) / n)
    return max(1, round(seconds / median(per_iter)))


@contextmanager
def _scratch(base: Path, name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"ckptbench-{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the CPU-bound training loop -----------------------------------------------------


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
    pool: Sequence[AnyEntry],
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


# -- running one loop ----------------------------------------------------------------


def run_loop(
    cfg: BenchConfig,
    base: Path,
    variant: Variant,
    *,
    memory: int,
    episodes: int,
    pool: Sequence[AnyEntry],
    burn_n: int,
    interval: float,
    budget_s: float | None = None,
) -> LoopRun:
    """One run of the CPU-bound loop in a fresh event loop and a fresh scratch dir."""
    log = fill_memory(memory, pool)
    with _scratch(base, "loop") as path:
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


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


# -- target 2 and 6: overhead of checkpointing every episode -------------------------


def _pointer_and_delete_cost(base: Path, pool: Sequence[AnyEntry], n: int) -> tuple[float, float]:
    """Median seconds of ``set_latest`` and of deleting one checkpoint, run directly."""
    from .storage.local import LocalStorage

    log = fill_memory(4000, pool)
    pointer, delete = [], []
    with _scratch(base, "pointer") as path:
        storage = LocalStorage(path)
        storage.open()
        try:
            prev = None
            for ep in range(1, n + 1):
                log.extend(pool[:4])
                snap = Snapshot(episode_index=ep, train_steps_total=ep, agent_type="BenchAgent",
                                memory=log).capture()
                outcome = storage.commit(snap, prev)
                prev = outcome.memory
                t = time.perf_counter()
                storage.set_latest(outcome)
                pointer.append(time.perf_counter() - t)
                if ep > 1:
                    t = time.perf_counter()
                    storage.delete(checkpoint_name(ep - 1))
                    delete.append(time.perf_counter() - t)
        finally:
            storage.close()
    return median(pointer), median(delete)


def bench_overhead(
    cfg: BenchConfig,
    base: Path,
    report: Report,
    *,
    pool: Sequence[AnyEntry],
    burn_n: int,
    baselines: dict[str, Variant] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Targets 2 and 6: the CPU-bound loop with checkpointing off, on, and controls."""
    kw: dict[str, Any] = dict(memory=0, episodes=cfg.episodes, pool=pool, burn_n=burn_n,
                              interval=LOWERED_SWITCH_INTERVAL)
    runs: dict[str, list[LoopRun]] = {"off": [], "ckpt": [], "control": []}
    written: list[int] = []
    for i in range(cfg.loop_repeats):
        log(f"  overhead: repeat {i + 1}/{cfg.loop_repeats}")
        # Interleaved, so drift in the machine's load hits every variant alike.
        runs["off"].append(run_loop(cfg, base, checkpointing_off, **kw))
        rec = Recorder()
        run = run_loop(cfg, base, ckptwriter_variant(rec, keep_last=cfg.keep_last), **kw)
        run.extra = rec.stats
        runs["ckpt"].append(run)
        written.append(rec.stats["written"])
        ctrl = Recorder()
        run = run_loop(cfg, base, ckptwriter_variant(ctrl, keep_last=None), **kw)
        run.extra = ctrl.stats
        runs["control"].append(run)
    ratios = [c.total_s / o.total_s - 1 for c, o in zip(runs["ckpt"], runs["off"], strict=True)]
    overhead = median(ratios) * 100
    report.figures.append(Figure(
        "2.overhead", "overhead, checkpoint every episode (last_n 5)", round(overhead, 2), "%",
        "<= 3 %", overhead <= 3.0,
        f"{cfg.episodes} episodes x {cfg.episode_cpu_s * 1e3:g} ms CPU; off "
        f"{median([r.total_s for r in runs['off']]):.2f} s; {median(written):.0f} written",
    ))
    loop_cpu = median([c.loop_cpu_s / o.loop_cpu_s - 1
                       for c, o in zip(runs["ckpt"], runs["off"], strict=True)]) * 100
    extra_cpu = [(c.cpu_s - o.cpu_s) / max(1, c.extra["written"])
                 for c, o in zip(runs["ckpt"], runs["off"], strict=True)]
    busy = median([(c.cpu_s - o.cpu_s) / c.total_s
                   for c, o in zip(runs["ckpt"], runs["off"], strict=True)]) * 100
    report.figures += [
        Figure("2.loop_cpu", "overhead in the loop thread's own CPU time", round(loop_cpu, 2),
               "%", "", None, "the loop's share of the cost; the rest is CPU the writer "
               "takes from a loaded machine"),
        Figure("2.writer_cpu", "checkpointing CPU per written checkpoint (all processes)",
               _ms(median(extra_cpu)), "ms", "", None,
               f"{busy:.0f} % of one core while checkpointing every episode (includes starting "
               "the writer process)"),
    ]
    for name, variant in (baselines or {}).items():
        log(f"  overhead: baseline {name}")
        vals = []
        for j in range(max(1, min(2, cfg.repeats))):
            run = run_loop(cfg, base, variant, **kw, budget_s=cfg.baseline_budget_s)
            ref = runs["off"][j % len(runs["off"])]
            k = len(run.marks)
            # Compared with the off run at the same episode: baselines may stop early.
            vals.append((run.marks[-1] / ref.marks[k - 1] - 1, k))
        ov = median([v for v, _ in vals]) * 100
        k = min(k for _, k in vals)
        report.figures.append(Figure(
            f"2.baseline.{name}", f"overhead, baseline: {name}", round(ov, 1), "%", "", None,
            "" if k == cfg.episodes else f"over the first {k} episodes (stopped at budget)",
        ))
    # The loop thread's own CPU time: the wall clock of a shared machine moves by more
    # than the 1 ms per checkpoint being judged (the wall figure is shown beside it).
    per_ckpt = [
        (c.loop_cpu_s - k.loop_cpu_s) / max(1, c.extra["written"])
        for c, k in zip(runs["ckpt"], runs["control"], strict=True)
    ]
    wall = [
        (c.total_s - k.total_s) / max(1, c.extra["written"])
        for c, k in zip(runs["ckpt"], runs["control"], strict=True)
    ]
    cost = median(per_ckpt)
    report.figures.append(Figure(
        "6.retention_loop", "retention (last_n 5): loop-thread time per checkpoint", _ms(cost),
        "ms", "<= 1 ms", cost <= 0.001,
        f"run with last_n 5 minus run keeping all (paired medians); wall clock "
        f"{_ms(median(wall))} ms",
    ))
    p99_on = median([percentile(r.hook_s, 99) for r in runs["ckpt"]])
    p99_ctrl = median([percentile(r.hook_s, 99) for r in runs["control"]])
    report.figures.append(Figure(
        "6.retention_stall", "retention: added submit p99", _ms(p99_on - p99_ctrl),
        "ms", "<= 0.1 ms (nothing)", p99_on - p99_ctrl <= 0.0001,
        f"submit p99 {_ms(p99_on)} ms with, {_ms(p99_ctrl)} ms without",
    ))
    pointer, delete = _pointer_and_delete_cost(base, pool, cfg.repeats * 20)
    report.figures.append(Figure(
        "6.pointer_writer", "latest pointer + one retention delete, in the writer",
        _ms(pointer + delete), "ms", "", None,
        f"pointer {_ms(pointer)} ms + delete {_ms(delete)} ms (median), spent in the writer "
        "process, never in submit()",
    ))
    report.raw["overhead"] = {
        name: [{"total_s": r.total_s, "episodes": len(r.marks), "loop_cpu_s": r.loop_cpu_s,
                "cpu_s": r.cpu_s,
                "submit_p99_ms": _ms(percentile(r.hook_s, 99)), **r.extra} for r in rs]
        for name, rs in runs.items()
    }


# -- targets 1 and 3: stall and freshness, small vs large memory ---------------------


def bench_stall_freshness(
    cfg: BenchConfig,
    base: Path,
    report: Report,
    *,
    pool: Sequence[AnyEntry],
    burn_n: int,
    log: Callable[[str], None] = print,
) -> None:
    """Targets 1 and 3: submit() stall and submit-to-durable latency under the loop.

    Each run first writes one full checkpoint (awaited, untimed), so the timed episodes
    measure the steady state; the first full write is reported on its own.
    """
    kw: dict[str, Any] = dict(episodes=cfg.stall_episodes, pool=pool, burn_n=burn_n)
    sizes = {"small": cfg.small_memory, "large": cfg.large_memory}
    p99: dict[str, list[float]] = {"small": [], "large": []}
    fresh: dict[str, list[float]] = {"small": [], "large": []}
    prime: dict[str, list[float]] = {"small": [], "large": []}
    raw: dict[str, Any] = {"small": [], "large": []}
    for i in range(cfg.loop_repeats):
        for side, n in sizes.items():
            log(f"  stall/freshness: repeat {i + 1}/{cfg.loop_repeats}, {side} memory "
                f"({n} entries)")
            rec = Recorder()
            run = run_loop(cfg, base, ckptwriter_variant(rec, prime=True), memory=n,
                           interval=LOWERED_SWITCH_INTERVAL, **kw)
            f = rec.freshness(skip=1)
            p99[side].append(percentile(run.hook_s, 99))
            fresh[side].append(percentile(f, 99))
            prime[side].append(rec.first_write_s)
            raw[side].append({"submit_p50_ms": _ms(percentile(run.hook_s, 50)),
                              "submit_p99_ms": _ms(p99[side][-1]),
                              "submit_max_ms": _ms(max(run.hook_s, default=0.0)),
                              "fresh_p50_ms": _ms(percentile(f, 50)),
                              "fresh_p99_ms": _ms(fresh[side][-1]),
                              "total_s": run.total_s, **rec.stats})
    small, large = median(p99["small"]), median(p99["large"])
    ratio = large / small if small else math.inf
    report.figures += [
        Figure("1.stall_p99", f"submit() stall p99, {cfg.large_memory:,} entries", _ms(large),
               "ms", "<= 1 ms", large <= 0.001,
               f"{cfg.stall_episodes} submits per run, coalesce, switch interval "
               f"{LOWERED_SWITCH_INTERVAL * 1e3:g} ms"),
        Figure("1.stall_flat", f"stall p99 {cfg.large_memory:,} / {cfg.small_memory:,} entries",
               round(ratio, 3), "x", "<= 1.5x", ratio <= 1.5,
               f"p99 {_ms(small)} ms at {cfg.small_memory:,}"),
        Figure("3.freshness_p99", f"submit-to-durable p99, {cfg.large_memory:,} entries",
               _ms(median(fresh["large"])), "ms", "<= 100 ms",
               median(fresh["large"]) <= 0.1,
               f"{_ms(median(fresh['small']))} ms at {cfg.small_memory:,} entries; "
               "checkpoint every episode, coalesce, max_pending 1"),
        Figure("3.first_full_write", f"first (full) checkpoint, {cfg.large_memory:,} entries",
               _ms(median(prime["large"])), "ms", "", None,
               "untimed priming write before the steady state"),
    ]
    floor = _copy_fsync_floor(base, fill_memory(cfg.large_memory, pool).to_jsonl(), cfg.repeats)
    report.figures.append(Figure(
        "3.floor", f"disk floor: copy + fsync of the {cfg.large_memory:,}-entry memory file",
        _ms(floor), "ms", "", None,
        "what every incremental checkpoint at that size must do on a filesystem without "
        "reflinks (ext4); a coalesced submit waits up to two of these",
    ))
    raw["floor_s"] = floor
    report.raw["stall_freshness"] = raw


def _copy_fsync_floor(base: Path, data: bytes, repeats: int) -> float:
    """Median seconds to copy_file_range ``data``'s file into a new file and fsync it."""
    out = []
    with _scratch(base, "floor") as path:
        src = path / "src"
        src.write_bytes(data)
        for i in range(max(1, repeats)):
            dst = path / f"dst{i}"
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                t = time.perf_counter()
                done = 0
                while done < len(data):
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), len(data) - done)
                    if n == 0:
                        break
                    done += n
                os.fsync(fout.fileno())
                out.append(time.perf_counter() - t)
            dst.unlink()
    return median(out)


# -- target 3: the GIL-trap options ---------------------------------------------------

# An option of where the writer runs: (switch interval, recorder -> loop variant).
Option = tuple[float, Callable[[Recorder], Variant]]


def executor_options() -> dict[str, Option]:
    """Where the writer runs: the writer process or a worker thread, at CPython's default
    switch interval (what a library user gets) and at the one ``ckptwriter train`` sets."""
    return {
        "process executor, 0.5 ms switch (ckptwriter train), coalesce [default]": (
            LOWERED_SWITCH_INTERVAL, lambda r: ckptwriter_variant(r, prime=True)),
        "process executor, 5 ms switch (CPython default), coalesce": (
            DEFAULT_SWITCH_INTERVAL, lambda r: ckptwriter_variant(r, prime=True)),
        "thread executor, 5 ms switch, coalesce": (
            DEFAULT_SWITCH_INTERVAL,
            lambda r: ckptwriter_variant(r, prime=True, executor="thread")),
        "thread executor, 0.5 ms switch, coalesce": (
            LOWERED_SWITCH_INTERVAL,
            lambda r: ckptwriter_variant(r, prime=True, executor="thread")),
        "thread executor, 0.5 ms switch, block": (
            LOWERED_SWITCH_INTERVAL,
            lambda r: ckptwriter_variant(r, prime=True, executor="thread",
                                         on_backlog="block", max_pending=2)),
    }


def bench_gil_options(
    cfg: BenchConfig,
    base: Path,
    report: Report,
    *,
    pool: Sequence[AnyEntry],
    burn_n: int,
    options: dict[str, Option],
    log: Callable[[str], None] = print,
) -> None:
    """Where the writer runs (target 3): loop overhead and freshness of each option at
    the large memory, each beside an off run at its switch interval."""
    kw: dict[str, Any] = dict(memory=cfg.large_memory, episodes=cfg.stall_episodes,
                              pool=pool, burn_n=burn_n, budget_s=cfg.baseline_budget_s)
    raw: dict[str, Any] = {}
    for name, (interval, make) in options.items():
        log(f"  GIL options: {name}")
        ratios, fresh, written = [], [], []
        for _ in range(max(1, min(2, cfg.repeats))):
            off = run_loop(cfg, base, checkpointing_off, interval=interval, **kw)
            rec = Recorder()
            on = run_loop(cfg, base, make(rec), interval=interval, **kw)
            k = len(on.marks)
            ratios.append(on.marks[-1] / off.marks[min(k, len(off.marks)) - 1] - 1)
            # A submit never made durable before the end counts as fresh as the drain.
            fresh.append(percentile(rec.freshness(skip=1), 99))
            written.append(rec.stats.get("written", 0))
        ov, fr = median(ratios) * 100, median(fresh)
        raw[name] = {"overhead_pct": ov, "fresh_p99_ms": _ms(fr), "written": written,
                     "episodes": k, "switch_interval_ms": interval * 1e3}
        report.figures.append(Figure(
            f"3.option.{name}", f"option: {name}", _ms(fr), "ms", "", None,
            f"freshness p99; loop overhead {ov:.1f} %, {median(written):.0f} written"
            + ("" if k == cfg.stall_episodes else f", stopped at episode {k}"),
        ))
    report.raw["gil_options"] = raw


# -- target 4: full-write throughput vs raw write+fsync ------------------------------


def _raw_write(path: Path, data: bytes) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


async def _one_full_checkpoint(
    path: Path, log: MemoryLog, executor: Literal["auto", "thread", "process"]
) -> CheckpointResult:
    async with CheckpointWriter(path, executor=executor) as writer:
        h = await writer.submit(Snapshot(episode_index=1, train_steps_total=1,
                                         agent_type="BenchAgent", memory=log))
        return await h.wait()


def bench_throughput(
    cfg: BenchConfig, base: Path, report: Report, *, log: Callable[[str], None] = print
) -> None:
    """Target 4: a full checkpoint of a ~1 GiB memory vs raw write+fsync of its bytes,
    with each executor, interleaved (raw, process, thread) in every repeat."""
    big = Observation(content="x" * (16 * 1024 - 40))
    mem = MemoryLog()
    while mem.nbytes < cfg.gib_bytes:
        mem.append(big)
    data = mem.to_jsonl()
    times: dict[str, list[float]] = {"raw": [], "process": [], "thread": []}
    for i in range(cfg.repeats):
        log(f"  throughput: repeat {i + 1}/{cfg.repeats} ({len(data) / 2**20:.0f} MiB)")
        with _scratch(base, "raw") as path:
            times["raw"].append(_raw_write(path / "raw.bin", data))
        for ex in ("process", "thread"):
            with _scratch(base, "full") as path:
                r = anyio.run(_one_full_checkpoint, path / "checkpoints", mem, ex)
                times[ex].append(r.latency_seconds)
    mib = len(data) / 2**20
    for ex in ("process", "thread"):
        ratio = median([r / c for r, c in zip(times["raw"], times[ex], strict=True)])
        default = ex == "process"
        report.figures.append(Figure(
            f"4.full_write_ratio.{ex}",
            f"full checkpoint / raw write+fsync, {mib:.0f} MiB, {ex} executor"
            + (" (default)" if default else ""),
            round(ratio * 100, 1), "%", ">= 80 %" if default else "",
            ratio >= 0.8 if default else None,
            f"checkpoint {mib / median(times[ex]):.0f} MiB/s, raw {mib / median(times['raw']):.0f}"
            " MiB/s (submit to durable: manifests, rename, pointer included)",
        ))
    report.raw["throughput"] = {"bytes": len(data), "seconds": times}


# -- target 5: incremental scaling and serializer throughput -------------------------


async def _grow(cfg: BenchConfig, path: Path, pool: Sequence[AnyEntry]) -> dict[str, Any]:
    log = MemoryLog()
    full_rewrite = 0
    k = len(pool)
    async with CheckpointWriter(path, keep_last=2, on_backlog="block") as writer:
        ep = 0
        while len(log) < cfg.incr_entries:
            start = len(log) % k
            n = min(cfg.incr_every, cfg.incr_entries - len(log))
            for j in range(n):
                log.append(pool[(start + j) % k])
            ep += 1
            full_rewrite += log.nbytes
            await writer.submit(Snapshot(episode_index=ep, train_steps_total=ep,
                                         agent_type="BenchAgent", memory=log))
        await writer.flush()
        s = writer.stats
    return {"checkpoints": ep, "final_bytes": log.nbytes, "final_entries": len(log),
            "bytes_serialized": s.bytes_serialized, "entries_serialized": s.entries_serialized,
            "bytes_written": s.bytes_written, "full_rewrite_bytes": full_rewrite}


def bench_incremental(
    cfg: BenchConfig,
    base: Path,
    report: Report,
    *,
    pool: Sequence[AnyEntry],
    log: Callable[[str], None] = print,
) -> None:
    """Target 5: grow memory with a checkpoint every ``incr_every`` entries."""
    log(f"  incremental: {cfg.incr_entries:,} entries, checkpoint every {cfg.incr_every:,}")
    with _scratch(base, "incr") as path:
        t = time.perf_counter()
        r = anyio.run(_grow, cfg, path / "checkpoints", pool)
        r["seconds"] = time.perf_counter() - t
    x = r["bytes_serialized"] / r["final_bytes"]
    report.figures += [
        Figure("5.incremental", f"serialized / final memory, {r['checkpoints']} checkpoints",
               round(x, 3), "x", "~1.0x (<= 1.05x)", x <= 1.05,
               f"entries serialized {r['entries_serialized']:,} of {r['final_entries']:,}; "
               f"{r['seconds']:.1f} s"),
        Figure("5.full_rewrite", "same run, full rewrite each checkpoint",
               round(r["full_rewrite_bytes"] / r["final_bytes"], 1), "x", "", None,
               "what a writer that re-serializes the whole memory would serialize"),
    ]
    report.raw["incremental"] = r


def bench_encode(
    cfg: BenchConfig, report: Report, *, pool: Sequence[AnyEntry],
    log: Callable[[str], None] = print,
) -> None:
    """Target 5: memory entries encoded to JSON Lines (``MemoryLog.append``), MB/s,
    beside stdlib json and pydantic on the same entries."""
    log(f"  encode: {cfg.encode_entries:,} entries")
    entries = [pool[i % len(pool)] for i in range(cfg.encode_entries)]
    rates: dict[str, list[float]] = {"append": [], "extend": []}
    for _ in range(max(5, cfg.repeats)):
        mem = MemoryLog()
        append = mem.append
        t = time.perf_counter()
        for e in entries:
            append(e)
        rates["append"].append(mem.nbytes / (time.perf_counter() - t) / 1e6)
        mem = MemoryLog()
        t = time.perf_counter()
        mem.extend(entries)
        rates["extend"].append(mem.nbytes / (time.perf_counter() - t) / 1e6)
    rate = median(rates["append"])
    per_entry = mem.nbytes / len(entries)
    report.figures += [
        Figure("5.encode", "entries encoded on append (msgspec), one at a time",
               round(rate, 1), "MB/s", ">= 200 MB/s", rate >= 200,
               f"{per_entry:.0f} B/entry, {rate / per_entry:.2f} M entries/s"),
        Figure("5.encode.extend", "entries encoded by MemoryLog.extend (batches)",
               round(median(rates["extend"]), 1), "MB/s", "", None,
               f"{median(rates['extend']) / per_entry:.2f} M entries/s"),
    ]
    sample = entries[: max(1, len(entries) // 8)]
    alt: dict[str, Callable[[AnyEntry], bytes]] = {
        "stdlib json": lambda e: (json.dumps(e.model_dump(), separators=(",", ":")) + "\n")
        .encode(),
        "pydantic model_dump_json": lambda e: e.model_dump_json().encode() + b"\n",
    }
    for name, fn in alt.items():
        t = time.perf_counter()
        n = sum(len(fn(e)) for e in sample)
        r = n / (time.perf_counter() - t) / 1e6
        report.figures.append(Figure(f"5.encode.{name}", f"encoder compared: {name}",
                                     round(r, 1), "MB/s", "", None, "same entries"))
    report.raw["encode"] = {"rates_mb_s": rates, "bytes_per_entry": per_entry}


# -- the suite -----------------------------------------------------------------------

BENCHMARKS = ("encode", "stall", "overhead", "options", "throughput", "incremental")


def run_suite(
    cfg: BenchConfig,
    target_dir: str | os.PathLike[str],
    *,
    only: Sequence[str] = BENCHMARKS,
    baselines: dict[str, Variant] | None = None,
    options: dict[str, Option] | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the benchmarks in ``only``, one at a time, in ``target_dir``.

    Args:
        cfg: sizes.
        target_dir: a directory on the disk to measure (scratch dirs go inside it).
        only: names from ``BENCHMARKS``.
        baselines: extra loop variants shown beside the overhead figure.
        options: where-the-writer-runs options besides :func:`executor_options`.
        log: progress lines.
    """
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHMARKS}")
    base = Path(target_dir)
    base.mkdir(parents=True, exist_ok=True)
    report = Report(machine=machine_info(base), config=asdict(cfg),
                    started=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    t0 = time.perf_counter()
    pool = entry_pool()
    burn_n = calibrate_burn(cfg.episode_cpu_s) if {"stall", "overhead", "options"} & set(
        only) else 0
    report.config["burn_iterations"] = burn_n
    steps: dict[str, Callable[[], None]] = {
        "encode": lambda: bench_encode(cfg, report, pool=pool, log=log),
        "stall": lambda: bench_stall_freshness(cfg, base, report, pool=pool, burn_n=burn_n,
                                               log=log),
        "overhead": lambda: bench_overhead(cfg, base, report, pool=pool, burn_n=burn_n,
                                           baselines=baselines, log=log),
        "options": lambda: bench_gil_options(cfg, base, report, pool=pool, burn_n=burn_n,
                                             options=executor_options() | (options or {}),
                                             log=log),
        "throughput": lambda: bench_throughput(cfg, base, report, log=log),
        "incremental": lambda: bench_incremental(cfg, base, report, pool=pool, log=log),
    }
    for name in BENCHMARKS:
        if name in only:
            try:
                steps[name]()
            except Exception as exc:
                # One broken benchmark (a full disk, say) must not lose the others.
                log(f"  {name}: FAILED: {type(exc).__name__}: {exc}")
                report.errors[name] = f"{type(exc).__name__}: {exc}"
    report.seconds = time.perf_counter() - t0
    report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    order = {f.id.split(".")[0]: i for i, f in enumerate(sorted(report.figures,
                                                                key=lambda f: f.id))}
    report.figures.sort(key=lambda f: (order[f.id.split(".")[0]], f.passed is None))
    return report


def print_report(report: Report, console: Any = None) -> None:
    """The machine and a table of figure, value, target and verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # A pipe or a log file gets a table wide enough to read, not rich's 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 180)
    m = report.machine
    console.print(
        f"[bold]machine[/]: {m['cores']} cores ({m['usable_cores']} usable), {m['python']}, "
        f"{m['kernel']}, {m['machine']}\n[bold]target dir[/]: {m['target_dir']} on "
        f"{m['fs_type']} ({m['device']} at {m['mount_point']})\n[bold]load average[/]: "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end', '?')} at end; "
        f"{report.seconds:.0f} s"
    )
    table = Table(title="ckptwriter benchmarks")
    for col in ("target #", "figure", "value", "target", "result", "note"):
        table.add_column(col, overflow="fold")
    style = {"PASS": "green", "MISS": "bold red", "info": "dim"}
    for f in report.figures:
        table.add_row(f.id.split(".")[0], escape(f.name), f"{f.value:.4g} {f.unit}",
                      escape(f.target), f"[{style[f.verdict]}]{f.verdict}[/]", escape(f.note))
    console.print(table)
    for name, err in report.errors.items():
        console.print(f"[bold red]benchmark {name} failed[/]: {escape(err)}")


def format_markdown(report: Report) -> str:
    """The machine line and the table as Markdown (for docs/PERFORMANCE.md, README)."""
    m = report.machine
    lines = [
        f"Machine: {m['cores']} cores, {m['python']}, {m['kernel']}; target dir on "
        f"{m['fs_type']}; load average {m['loadavg_start'][0]} at start, "
        f"{m.get('loadavg_end', ['?'])[0]} at end; run {report.started}, {report.seconds:.0f} s.",
        "",
        "| # | figure | value | target | result | note |",
        "|---|---|---|---|---|---|",
    ]
    for f in report.figures:
        cells = [f.id.split(".")[0], f.name, f"{f.value:.4g} {f.unit}", f.target,
                 f"**{f.verdict}**" if f.verdict == "MISS" else f.verdict, f.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(report: Report, path: str | os.PathLike[str]) -> None:
    """Write the report as indented JSON (parent directories created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def build_parser(prog: str = "ckptwriter bench") -> argparse.ArgumentParser:
    """The command-line options shared by ``ckptwriter bench`` and ``python -m benchmarks``."""
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Measure what checkpointing costs a CPU-bound training loop on this machine and "
        "disk: submit() stall, overhead, freshness, throughput, incremental scaling."))
    ap.add_argument("--memory-entries", type=int, metavar="N", default=None,
                    help="entries in the large memory of the stall/freshness runs and of "
                         "the incremental run (default 1,000,000; 200,000 with --quick)")
    ap.add_argument("--dir", metavar="PATH", default=None,
                    help="directory on the disk to measure (default: a temp dir in the "
                         "current directory)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, a couple of minutes")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", metavar="NAME", action="append", choices=BENCHMARKS,
                    help=f"run only these benchmarks (repeatable): {', '.join(BENCHMARKS)}")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3)")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write results here")
    ap.add_argument("--markdown", metavar="FILE", default=None,
                    help="also write the table as Markdown here")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 when a target is missed")
    return ap


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Sizes from parsed arguments."""
    cfg = SIZES[args.size or ("quick" if args.quick else "full")]
    if args.memory_entries is not None:
        if args.memory_entries < 1:
            raise SystemExit(
                f"--memory-entries must be >= 1, got {args.memory_entries}; "
                "pass the number of entries your agent's memory reaches"
            )
        cfg = replace(cfg, large_memory=args.memory_entries, incr_entries=args.memory_entries)
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
        cfg = replace(cfg, repeats=args.repeats, loop_repeats=args.repeats)
    return cfg


def main(argv: list[str]) -> int:
    """``ckptwriter bench``: run the benchmarks, print the table, optionally write JSON.

    Returns:
        0, or 1 with ``--strict`` when a target was missed.
    """
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    only = tuple(args.only or BENCHMARKS)
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="ckptwriter-bench-", dir=".") as tmp:
            report = run_suite(cfg, tmp, only=only)
    else:
        report = run_suite(cfg, args.dir, only=only)
    print_report(report)
    if args.json:
        write_json(report, args.json)
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(report), encoding="utf-8")
    missed = [f for f in report.figures if f.passed is False]
    return 1 if report.errors or (args.strict and missed) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
