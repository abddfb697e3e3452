"""Target 5: how much a growing memory costs to serialize, and how fast entries encode.

5. Incremental scaling (~1.0x the final memory serialized) and encoding >= 200 MB/s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from ckptwriter import CheckpointWriter, MemoryLog, Snapshot

from .report import Figure, Report
from .sizes import BenchConfig
from .workload import Entry, median, scratch

__all__ = ["bench_encode", "bench_incremental"]


async def _grow(cfg: BenchConfig, path: Path, pool: Sequence[Entry]) -> dict[str, Any]:
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
    pool: Sequence[Entry],
    log: Callable[[str], None] = print,
) -> None:
    """Target 5: grow memory with a checkpoint every ``incr_every`` entries."""
    log(f"  incremental: {cfg.incr_entries:,} entries, checkpoint every {cfg.incr_every:,}")
    with scratch(base, "incr") as path:
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
    cfg: BenchConfig, report: Report, *, pool: Sequence[Entry],
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
    alt: dict[str, Callable[[Entry], bytes]] = {
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
