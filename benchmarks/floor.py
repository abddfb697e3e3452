"""Targets 8 and 9: the loop at the filesystem's floor, and the drain (issue 13).

The issue's workload: episodes of about 1.3 ms of pure-Python CPU, a 100,000-entry memory
(about 11 MB) growing by 4 entries per episode, a checkpoint every 5 episodes, ``last_n
5``, 300 episodes; a total includes leaving the writer's context (the drain), not
entering it (opening, one priming full checkpoint). Measured side by side, interleaved
in every repeat: the loop without checkpointing, then each setting, then the raw floor.

8. The loop at the floor: default settings on a reflink filesystem (an XFS loop mount,
   made for the run where root and ``mkfs.xfs`` are there) within 1.15x of no
   checkpointing; ``coalesce`` on the target directory (ext4) within 1.15x; ``block`` (the
   default) on the target directory: the median commit within 1.1x of the raw
   ``copy_file_range`` + ``fsync`` of the same memory file measured in the same run.
9. Drain: leaving the writer's context with one checkpoint in flight costs at most that
   commit + 20 ms.

Also ``python -m benchmarks.floor [--dir PATH] [--repeats 5]`` on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import anyio

from ckptwriter import CheckpointHandle, CheckpointWriter, MemoryLog, Snapshot
from ckptwriter.bench import clones, disk_floor, filesystem_type

from .loop import LOWERED_SWITCH_INTERVAL, EpisodeHook, checkpointing_off, run_loop
from .report import Figure, Report
from .sizes import BenchConfig
from .workload import Entry, burn_cpu, fill_memory, median, percentile

__all__ = ["ISSUE_WORKLOAD", "bench_floor", "reflink_mount"]

Backlog = Literal["block", "coalesce"]


@dataclass(frozen=True)
class Workload:
    """The issue's loop."""

    memory: int = 100_000
    episodes: int = 300
    every: int = 5
    keep_last: int = 5
    episode_cpu_s: float = 0.0013


ISSUE_WORKLOAD = Workload()


@dataclass
class _Commits:
    """What one writer run committed: seconds in the writer per commit, and in submit."""

    commit_s: list[float] = field(default_factory=list)
    submit_s: list[float] = field(default_factory=list)
    written: int = 0


def _variant(res: _Commits, work: Workload, on_backlog: Backlog | None) -> Callable[
        [Path, MemoryLog], AbstractAsyncContextManager[EpisodeHook | None]]:
    """Checkpoint every ``work.every`` episodes (``on_backlog`` None: the defaults)."""

    def variant(path: Path, log: MemoryLog) -> AbstractAsyncContextManager[EpisodeHook]:
        @asynccontextmanager
        async def cm() -> AsyncIterator[EpisodeHook]:
            kw: dict[str, Any] = {} if on_backlog is None else {"on_backlog": on_backlog,
                                                                 "max_pending": 1}
            handles: list[CheckpointHandle] = []
            async with CheckpointWriter(path / "checkpoints", strategy="last_n",
                                        keep_last=work.keep_last, **kw) as writer:
                await (await writer.submit(Snapshot(0, 0, "BenchAgent", log))).wait()
                perf = time.perf_counter

                async def hook(ep: int) -> None:
                    if ep % work.every == 0:
                        t = perf()
                        handles.append(await writer.submit(Snapshot(ep, ep, "BenchAgent", log)))
                        res.submit_s.append(perf() - t)

                yield hook
            for h in handles:
                with contextlib.suppress(Exception):
                    r = await h.wait()
                    # The copy made ahead of the commit is the commit's work too.
                    res.commit_s.append(r.serialize_seconds + r.write_seconds
                                        + r.prepare_seconds)
            res.written = writer.stats.written

        return cm()

    return variant


async def _drain_once(root: Path, log: MemoryLog, pool: Sequence[Entry], burn_n: int,
                      work: Workload) -> tuple[float, float]:
    """Seconds to leave the writer's context with one checkpoint just submitted, and
    the seconds that checkpoint's commit took in the writer."""
    writer = CheckpointWriter(root, strategy="last_n", keep_last=work.keep_last)
    await writer.__aenter__()
    try:
        await (await writer.submit(Snapshot(0, 0, "BenchAgent", log))).wait()
        for _ in range(work.every):
            burn_cpu(burn_n)
            log.extend(pool[:4])
            await anyio.sleep(0)  # noqa: ASYNC115
        handle = await writer.submit(Snapshot(1, 1, "BenchAgent", log))
    except BaseException:
        await writer.__aexit__(None, None, None)
        raise
    t = time.perf_counter()
    await writer.__aexit__(None, None, None)
    drain = time.perf_counter() - t
    r = await handle.wait()
    return drain, r.serialize_seconds + r.write_seconds


_MKFS_XFS = ("mkfs.xfs", "-q", "-f", "-m", "reflink=1")


@contextlib.contextmanager
def reflink_mount(base: Path, size: int = 2 << 30) -> Iterator[Path]:
    """An XFS filesystem with reflink on a loop device under ``base``, mounted.

    Raises:
        RuntimeError: it cannot be made here (the message says why: not root, no
            ``mkfs.xfs``, the mount refused).
    """
    if os.geteuid() != 0:
        raise RuntimeError("not root (a loop mount needs root)")
    if shutil.which(_MKFS_XFS[0]) is None:
        raise RuntimeError("mkfs.xfs not installed (Debian package xfsprogs)")
    image, mnt = base / "xfs-reflink.img", base / "mnt-xfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    made = subprocess.run([*_MKFS_XFS, str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeError(f"mkfs.xfs failed: {made.stderr.strip()}")
    res = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mount failed: {res.stderr.strip() or res.returncode}")
    try:
        if not clones(mnt):
            raise RuntimeError("the XFS mount does not clone files (no reflink)")
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def _ratio(on: list[float], off: list[float]) -> float:
    return median([a / b for a, b in zip(on, off, strict=True)]) if on else float("nan")


def bench_floor(
    cfg: BenchConfig,
    base: Path,
    report: Report,
    *,
    pool: Sequence[Entry],
    burn_n: int,
    work: Workload = ISSUE_WORKLOAD,
    log: Callable[[str], None] = print,
) -> None:
    """Targets 8 and 9 (module docstring), every repeat interleaved."""
    n_burn = max(1, round(burn_n * work.episode_cpu_s / cfg.episode_cpu_s))
    memory = min(work.memory, cfg.large_memory)
    work = Workload(memory, cfg.floor_episodes, work.every, work.keep_last, work.episode_cpu_s)
    kw: dict[str, Any] = dict(memory=memory, episodes=work.episodes, pool=pool,
                              burn_n=n_burn, interval=LOWERED_SWITCH_INTERVAL)
    fs = filesystem_type(base)["fs_type"]
    with contextlib.ExitStack() as stack:
        xfs: Path | None = None
        why = "not asked for (floor_reflink off at this size)"
        if cfg.floor_reflink:
            try:
                xfs, why = stack.enter_context(reflink_mount(base)), ""
            except (RuntimeError, OSError) as exc:
                why = str(exc)
        sides: dict[str, tuple[Path, Backlog | None]] = {
            "block": (base, None), "coalesce": (base, "coalesce")}
        if xfs is not None:
            sides |= {"xfs": (xfs, None), "xfs_coalesce": (xfs, "coalesce")}
        totals: dict[str, list[float]] = {k: [] for k in ("off", *sides)}
        runs: dict[str, list[_Commits]] = {k: [] for k in sides}
        floors: list[float] = []
        drains: list[float] = []
        drain_commits: list[float] = []
        for i in range(cfg.loop_repeats):
            log(f"  floor: repeat {i + 1}/{cfg.loop_repeats} ({memory:,} entries, "
                f"{work.episodes} episodes, every {work.every}; {', '.join(sides)})")
            totals["off"].append(run_loop(cfg, base, checkpointing_off, **kw).total_s)
            for name, (where, backlog) in sides.items():
                res = _Commits()
                run = run_loop(cfg, where, _variant(res, work, backlog), **kw)
                totals[name].append(run.total_s)
                runs[name].append(res)
            floors.append(disk_floor(base, fill_memory(memory + work.episodes * 2, pool),
                                     repeats=3))
            d, c = anyio.run(_drain_in_scratch, base, fill_memory(memory, pool), pool, n_burn,
                             work)
            drains.append(d)
            drain_commits.append(c)
    _figures(report, work, memory, fs, totals, runs, floors, drains, drain_commits, why)


async def _drain_in_scratch(base: Path, log: MemoryLog, pool: Sequence[Entry], burn_n: int,
                            work: Workload) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="ckptbench-drain-", dir=base) as tmp:
        return await _drain_once(Path(tmp) / "checkpoints", log, pool, burn_n, work)


def _figures(report: Report, work: Workload, memory: int, fs: str,
             totals: dict[str, list[float]], runs: dict[str, list[_Commits]],
             floors: list[float], drains: list[float], drain_commits: list[float],
             why: str) -> None:
    what = (f"{memory:,} entries +4/episode, {work.episodes} episodes of "
            f"{work.episode_cpu_s * 1e3:g} ms CPU, every {work.every}, last_n {work.keep_last}")

    def loop_row(key: str, name: str, target: bool) -> Figure:
        x = _ratio(totals[key], totals["off"])
        rs = runs[key]
        sub = median([percentile(r.submit_s, 50) for r in rs]) * 1e3
        return Figure(f"8.loop.{key}", name, round(x, 3), "x",
                      "<= 1.15x" if target else "", (x <= 1.15) if target else None,
                      f"{what}; off {median(totals['off']):.3f} s; submit p50 {sub:.2f} ms; "
                      f"{median([r.written for r in rs]):.0f} written")

    figs = []
    if "xfs" in totals:
        figs += [loop_row("xfs", "loop total / no checkpointing, default settings, XFS "
                                 "reflink (loop mount)", True),
                 loop_row("xfs_coalesce", "loop total / no checkpointing, coalesce, XFS "
                                          "reflink", False)]
    else:
        figs.append(Figure("8.loop.xfs", "loop total / no checkpointing, default settings, "
                           "XFS reflink", 0.0, "x", "<= 1.15x", None, f"skipped: {why}"))
    figs += [loop_row("coalesce", f"loop total / no checkpointing, coalesce, {fs}", True),
             loop_row("block", f"loop total / no checkpointing, default (block), {fs}", False)]
    commits = [median(r.commit_s) for r in runs["block"]]
    x = _ratio(commits, floors)
    figs.append(Figure(
        "8.block_commit", f"commit / raw copy+fsync floor, block, {fs}", round(x, 3), "x",
        "<= 1.1x", x <= 1.1,
        f"commit {median(commits) * 1e3:.1f} ms (in the writer: copy, also one made ahead, "
        "files, fsyncs, rename, "
        f"pointer, retention) vs copy_file_range + fsync {median(floors) * 1e3:.1f} ms of "
        "the same file, same run"))
    extra = [d - c for d, c in zip(drains, drain_commits, strict=True)]
    e = median(extra)
    figs.append(Figure(
        "9.drain", "drain: leaving the context with one checkpoint in flight, minus that "
        "commit", round(e * 1e3, 2), "ms", "<= 20 ms", e <= 0.020,
        f"exit {median(drains) * 1e3:.1f} ms, the commit {median(drain_commits) * 1e3:.1f} ms "
        f"({memory:,} entries, {fs}, default settings)"))
    report.figures += figs
    report.raw["floor"] = {"totals_s": totals, "floor_s": floors, "drain_s": drains,
                           "drain_commit_s": drain_commits,
                           "commit_s": {k: [median(r.commit_s) for r in v]
                                        for k, v in runs.items()}}


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.floor``: only these rows, printed as the suite prints."""
    from .machine import machine_info
    from .report import print_report
    from .sizes import SIZES
    from .workload import calibrate_burn, entry_pool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", default=".")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = replace(SIZES["full"], loop_repeats=args.repeats)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckptwriter-floor-", dir=args.dir) as tmp:
        report = Report(machine=machine_info(tmp), config={})
        t = time.perf_counter()
        bench_floor(cfg, Path(tmp), report, pool=entry_pool(),
                    burn_n=calibrate_burn(cfg.episode_cpu_s))
        report.seconds = time.perf_counter() - t
        report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(report)


if __name__ == "__main__":
    main()
