"""``ckptwriter bench --plot FILE.png``: where a checkpoint setting sits on this disk.

A sweep of the bench loop (CPU-bound episodes, memory growing by one episode's entries
each time) over checkpoint intervals, at a small and a large memory, with ``block`` and
``coalesce``, beside the same loop without checkpointing. Drawn: the loop's total time
over the no-checkpoint time, and the submit stall p99, each against the interval, with
the disk floor beside them (a raw copy + fsync of the memory file, what one commit of
the guide's format costs this disk at the least). matplotlib is an optional extra
(``pip install 'ckptwriter[plot]'``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio

from .bench_workload import SWITCH_INTERVAL, entries, memory_of, percentile
from .gil import switch_interval
from .memory import MemoryLog
from .snapshot import Snapshot
from .writer import CheckpointWriter

__all__ = ["INTERVALS", "SweepPoint", "disk_floor", "draw", "sweep"]

# Checkpoint every N episodes: from "every episode" to a sparse, common setting.
INTERVALS = (1, 2, 5, 10, 25)
Backlog = Literal["block", "coalesce"]


@dataclass(frozen=True)
class SweepPoint:
    """One loop run: its setting and what it cost."""

    memory_entries: int
    interval: int
    on_backlog: Backlog | None  # None: the loop without checkpointing
    total_s: float
    stall_p99_ms: float


async def _loop(root: Path, memory: MemoryLog, episodes: int, cpu_s: float,
                interval: int, on_backlog: Backlog | None) -> SweepPoint:
    episode = entries()
    stall: list[float] = []
    perf = time.perf_counter
    n0 = len(memory)

    async def run(writer: CheckpointWriter | None) -> None:
        for ep in range(1, episodes + 1):
            end = perf() + cpu_s
            while perf() < end:
                pass  # pure-Python work holds the GIL, like an agent's step logic
            memory.extend(episode)
            if writer is not None and ep % interval == 0:
                t0 = perf()
                await writer.submit(Snapshot(ep, ep, "BenchAgent", memory))
                stall.append(perf() - t0)
            await anyio.sleep(0)  # noqa: ASYNC115 - a loop that never really waits

    if on_backlog is None:
        t = perf()
        await run(None)
        total = perf() - t
    else:
        async with CheckpointWriter(root, strategy="last_n", keep_last=3, max_pending=1,
                                    on_backlog=on_backlog) as writer:
            await (await writer.submit(Snapshot(0, 0, "BenchAgent", memory))).wait()
            t = perf()
            await run(writer)
        total = perf() - t  # leaving the context (the drain) is part of the cost
    return SweepPoint(n0, interval, on_backlog, total, percentile(stall, 99) * 1e3)


def disk_floor(base: Path, memory: MemoryLog, repeats: int = 3) -> float:
    """Seconds of the cheapest commit of ``memory``'s file: copy its bytes, fsync.

    ``copy_file_range`` as the writer copies a memory prefix, so on a filesystem that
    clones (XFS with reflink, btrfs) the floor is the clone, as the writer's is.
    """
    data = memory.to_jsonl()
    times = []
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        src = Path(tmp, "src")
        src.write_bytes(data)
        for i in range(repeats):
            dst = Path(tmp, f"dst{i}")
            t = time.perf_counter()
            with open(src, "rb") as s, open(dst, "wb") as d:
                left = len(data)
                while left:
                    n = os.copy_file_range(s.fileno(), d.fileno(), left)
                    if n == 0:
                        break
                    left -= n
                os.fsync(d.fileno())
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def sweep(base: Path, memories: tuple[int, ...], episodes: int, cpu_s: float,
          progress: Any = print) -> tuple[list[SweepPoint], dict[int, float]]:
    """Every (memory, interval, backlog) run, the no-checkpoint runs and the floors."""
    points: list[SweepPoint] = []
    floors: dict[int, float] = {}
    settings: list[tuple[int, Backlog | None]] = [(1, None)] + [
        (i, b) for b in ("block", "coalesce") for i in INTERVALS]
    for n in memories:
        floors[n] = disk_floor(base, memory_of(n))
        for k, (interval, backlog) in enumerate(settings, 1):
            progress(f"  memory {n:,} entries: run {k}/{len(settings)} "
                     f"({backlog or 'no checkpoints'}, every {interval})")
            with tempfile.TemporaryDirectory(dir=base) as path, switch_interval(SWITCH_INTERVAL):
                points.append(anyio.run(_loop, Path(path), memory_of(n), episodes, cpu_s,
                                        interval, backlog))
    return points, floors


def draw(points: list[SweepPoint], floors: dict[int, float], machine: dict[str, Any],
         episode_s: float, path: Path) -> None:
    """Write the picture to ``path`` (PNG, or any format matplotlib knows by suffix).

    Raises:
        SystemExit: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ckptwriter bench --plot needs matplotlib: "
                         "pip install 'ckptwriter[plot]'") from None
    memories = sorted(floors)
    fig, axes = plt.subplots(2, len(memories), figsize=(5.5 * len(memories), 8),
                             squeeze=False, sharex=True)
    for col, n in enumerate(memories):
        base = next(p.total_s for p in points if p.memory_entries == n and p.on_backlog is None)
        floor_ms = floors[n] * 1e3
        top, bottom = axes[0][col], axes[1][col]
        for backlog, style in (("block", "o-"), ("coalesce", "s-")):
            row = sorted((p for p in points if p.memory_entries == n and p.on_backlog == backlog),
                         key=lambda p: p.interval)
            xs = [p.interval for p in row]
            top.plot(xs, [p.total_s / base for p in row], style, label=backlog)
            # A log axis: clamped at 1 us, the timer's resolution here, so a zero shows.
            bottom.plot(xs, [max(p.stall_p99_ms, 1e-3) for p in row], style, label=backlog)
        # The bound for block: the writer, beside the loop, can make a checkpoint no
        # faster than one copy+fsync of the memory file, so a loop that asks for them
        # faster than that waits for it. Above it: each commit's other work (its small
        # files, renames, pointer), which matters most when the memory is small.
        top.plot(INTERVALS, [max(1.0, floors[n] / (i * episode_s)) for i in INTERVALS],
                 "k--", label="block bound: one copy+fsync per checkpoint")
        top.axhline(1.0, color="grey", lw=0.8)
        bottom.axhline(floor_ms, color="k", ls="--",
                       label=f"one copy+fsync of the memory file: {floor_ms:.2g} ms")
        top.set_title(f"memory {n:,} entries")
        top.set_ylabel("loop time / no checkpoints (x)")
        bottom.set_ylabel("submit stall p99 (ms)")
        bottom.set_xlabel("checkpoint every N episodes")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xticks(list(INTERVALS), [str(i) for i in INTERVALS])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        bottom.set_yscale("log")
    reflink = ("clones files (reflink): commits copy only the delta" if machine.get("clones")
               else "no reflink: each commit copies the whole memory file; XFS with reflink "
                    "or btrfs would clone it")
    fig.suptitle(f"ckptwriter on {machine['target_dir']} ({machine['fs_type']}; {reflink})\n"
                 f"{machine['cpus']} CPUs, {machine['python']}; episodes of "
                 f"{episode_s * 1e3:g} ms CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
