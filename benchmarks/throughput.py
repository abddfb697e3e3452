"""Target 4: a full checkpoint against raw write+fsync of the same bytes.

4. A full write of a 1 GiB memory >= 80 % of raw write+fsync throughput, with the process
   executor (the default) and the thread executor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import anyio

from ckptwriter import CheckpointResult, CheckpointWriter, MemoryLog, Observation, Snapshot
from ckptwriter.bench import raw_write

from .report import Figure, Report
from .sizes import BenchConfig
from .workload import median, scratch

__all__ = ["bench_throughput"]


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
    with each executor, interleaved in every repeat (after one untimed raw write)."""
    big = Observation(content="x" * (16 * 1024 - 40))
    mem = MemoryLog()
    while mem.nbytes < cfg.gib_bytes:
        mem.append(big)
    data = mem.to_jsonl()
    times: dict[str, list[float]] = {"raw": [], "process": [], "thread": []}
    # Untimed, once: the first 1 GiB of page cache this process fills costs several times
    # what later ones do (on a VM each first touch of a guest page can fault to the
    # host), and whichever side ran first would pay it.
    with scratch(base, "warm") as path:
        raw_write(path / "raw.bin", data)
    sides: list[Literal["raw", "process", "thread"]] = ["raw", "process", "thread"]
    for i in range(cfg.repeats):
        log(f"  throughput: repeat {i + 1}/{cfg.repeats} ({len(data) / 2**20:.0f} MiB)")
        # A different side first in each repeat: none always follows the same neighbour.
        for side in sides[i % 3:] + sides[:i % 3]:
            with scratch(base, side) as path:
                if side == "raw":
                    times["raw"].append(raw_write(path / "raw.bin", data))
                else:
                    r = anyio.run(_one_full_checkpoint, path / "checkpoints", mem, side)
                    times[side].append(r.latency_seconds)
    mib = len(data) / 2**20
    for ex in ("process", "thread"):
        ratio = median([r / c for r, c in zip(times["raw"], times[ex], strict=True)])
        default = ex == "process"
        report.figures.append(Figure(
            f"4.full_write_ratio.{ex}",
            f"full checkpoint / raw write+fsync, {mib:.0f} MiB, {ex} executor"
            + (" (default)" if default else ""),
            round(ratio * 100, 1), "%", ">= 80 %", ratio >= 0.8,
            f"checkpoint {mib / median(times[ex]):.0f} MiB/s, raw {mib / median(times['raw']):.0f}"
            " MiB/s (submit to durable: manifests, rename, pointer included)",
        ))
    report.raw["throughput"] = {"bytes": len(data), "seconds": times}
