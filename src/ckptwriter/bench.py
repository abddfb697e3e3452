"""``ckptwriter bench``: what checkpointing costs on this machine and this disk.

On the directory given with ``--dir``: the **stall** (time in ``await writer.submit()``,
p50/p99) of a CPU-bound loop checkpointing every episode, with a small and a large
memory; **freshness** (submit until durable) in the same runs; and the **throughput** of
one full checkpoint beside a raw ``write`` + ``fsync`` of the same bytes. The
repository's suite (``make bench``, not in the wheel) judges these and more against the
project's performance targets, beside comparison baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from .bench_plot import disk_floor
from .bench_workload import SWITCH_INTERVAL, entries, memory_of, percentile, raw_write
from .gil import switch_interval
from .handles import CheckpointHandle
from .memory import MemoryLog, Observation
from .snapshot import Snapshot
from .writer import CheckpointWriter

__all__ = ["clones", "disk_floor", "filesystem_type", "main", "raw_write"]

BENCHMARKS = ("stall", "freshness", "throughput")
_MOUNT_TABLES = ("/proc/self/mountinfo", "/proc/mounts")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class _Sizes:
    small_memory: int = 1_000
    large_memory: int = 1_000_000
    episodes: int = 2_000
    episode_cpu_s: float = 0.001
    throughput_bytes: int = 1 << 30
    repeats: int = 3
    # --plot: a sweep of short runs (the performance issue's workload at full size).
    plot_memories: tuple[int, ...] = (1_000, 100_000)
    plot_episodes: int = 300
    plot_episode_cpu_s: float = 0.0013


_SIZES = {
    "full": _Sizes(),
    "quick": _Sizes(large_memory=200_000, episodes=800, throughput_bytes=256 << 20),
    # A few seconds in all: for the tests.
    "tiny": _Sizes(small_memory=100, large_memory=2_000, episodes=30, episode_cpu_s=0.0002,
                   throughput_bytes=2 << 20, repeats=1, plot_memories=(100, 2_000),
                   plot_episodes=12, plot_episode_cpu_s=0.0002),
}


def filesystem_type(
    path: str | os.PathLike[str], tables: tuple[str, ...] = _MOUNT_TABLES
) -> dict[str, str]:
    """The filesystem holding ``path``: its type, mount point and device.

    Read from the first readable mount table (``/proc/self/mountinfo``, else
    ``/proc/mounts``): the longest mount point that contains the path, the last one
    mounted if several share it. ``"unknown"`` where none can be read (not Linux).
    """
    real = os.path.realpath(path)
    found = {"fs_type": "unknown", "mount_point": "?", "device": "?"}
    for source in tables:
        try:
            with open(source, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        best = -1
        for line in lines:
            if source.endswith("mountinfo"):
                # "36 35 98:0 /root /mnt opts [optional...] - ext4 /dev/sda1 superopts"
                left, _, right = line.partition(" - ")
                fields = [*left.split()[4:5], *right.split()[:2]]
            else:  # "/dev/sda1 /mnt ext4 opts 0 0"
                parts = line.split()
                fields = [parts[1], parts[2], parts[0]] if len(parts) >= 3 else []
            if len(fields) != 3:
                continue
            # Mount tables escape space, tab, newline and backslash as octal (\040).
            mnt, fstype, dev = (_OCTAL.sub(lambda m: chr(int(m[1], 8)), x) for x in fields)
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= best:
                found, best = {"fs_type": fstype, "mount_point": mnt, "device": dev}, len(mnt)
        break
    return found


_FICLONE = 0x40049409  # Linux ioctl: make the destination share the source's extents


def clones(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem holding directory ``path`` clones files (reflink).

    Where it does (XFS with reflink, btrfs), an incremental checkpoint's memory prefix is
    shared with the previous checkpoint's, so a commit writes only the delta; elsewhere
    (ext4, tmpfs) the kernel copies the prefix. Tried for real on two temporary files.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    with tempfile.TemporaryDirectory(prefix=".ckptwriter-clone-", dir=path) as tmp:
        src, dst = Path(tmp, "a"), Path(tmp, "b")
        src.write_bytes(b"\0" * 65536)
        with open(src, "rb") as s, open(dst, "wb") as d:
            try:
                fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
            except OSError:
                return False
    return True


def _machine(target: Path) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "target_dir": str(target.resolve()),
        **filesystem_type(target),
        "clones": clones(target),
    }


@dataclass
class _LoopRun:
    stall: list[float]
    freshness: list[float]
    written: int


async def _loop(root: Path, memory: MemoryLog, sizes: _Sizes) -> _LoopRun:
    """Checkpoint every episode of a CPU-bound loop; submit and freshness seconds."""
    episode = entries()
    submitted: dict[int, float] = {}
    handles: list[CheckpointHandle] = []
    stall: list[float] = []
    perf = time.perf_counter
    async with CheckpointWriter(root, strategy="last_n", keep_last=5, on_backlog="coalesce",
                                max_pending=1) as writer:
        # One full checkpoint first, untimed: the timed episodes are the steady state.
        first = await writer.submit(Snapshot(0, 0, "BenchAgent", memory))
        await first.wait()
        for ep in range(1, sizes.episodes + 1):
            end = perf() + sizes.episode_cpu_s
            while perf() < end:
                pass  # pure-Python work holds the GIL, like an agent's step logic
            memory.extend(episode)
            submitted[ep] = t0 = perf()
            handles.append(await writer.submit(Snapshot(ep, ep, "BenchAgent", memory)))
            stall.append(perf() - t0)
            await anyio.sleep(0)  # noqa: ASYNC115 - a loop that never really waits
        results = [await h.wait() for h in handles]
    # A coalesced submit is fresh once the newer snapshot that replaced it is durable.
    fresh = [submitted[r.episode_index] + r.latency_seconds - submitted[h.episode_index]
             for h, r in zip(handles, results, strict=True)]
    return _LoopRun(stall, fresh, writer.stats.written)


async def _full_checkpoint(root: Path, memory: MemoryLog) -> float:
    async with CheckpointWriter(root) as writer:
        handle = await writer.submit(Snapshot(1, 1, "BenchAgent", memory))
        return (await handle.wait()).latency_seconds


def _bench_loop(base: Path, sizes: _Sizes) -> dict[str, list[dict[str, float]]]:
    """Stall and freshness rows at the small and the large memory (the same runs)."""
    out: dict[str, list[dict[str, float]]] = {"stall": [], "freshness": []}
    for n in (sizes.small_memory, sizes.large_memory):
        runs = []
        for _ in range(sizes.repeats):
            with tempfile.TemporaryDirectory(dir=base) as path, switch_interval(SWITCH_INTERVAL):
                runs.append(anyio.run(_loop, Path(path), memory_of(n), sizes))
        for key, samples in (("stall", [r.stall for r in runs]),
                             ("freshness", [r.freshness for r in runs])):
            out[key].append({
                "memory_entries": n,
                **{f"p{q}_ms": round(statistics.median(percentile(v, q) for v in samples)
                                     * 1e3, 4) for q in (50, 99)},
                "checkpoints_written": statistics.median(r.written for r in runs),
            })
    return out


def _bench_throughput(base: Path, sizes: _Sizes) -> dict[str, float]:
    """A full checkpoint of a large memory, and raw write+fsync of its bytes."""
    big = Observation(content="x" * (16 * 1024 - 40))
    memory = MemoryLog()
    while memory.nbytes < sizes.throughput_bytes:
        memory.append(big)
    data = memory.to_jsonl()
    raw, ckpt = [], []
    for _ in range(sizes.repeats):
        with tempfile.TemporaryDirectory(dir=base) as path:
            raw.append(raw_write(Path(path) / "raw.bin", data))
            ckpt.append(anyio.run(_full_checkpoint, Path(path) / "checkpoints", memory))
    mib = len(data) / 2**20
    return {
        "mib": round(mib, 1),
        "raw_mib_s": round(mib / statistics.median(raw), 1),
        "checkpoint_mib_s": round(mib / statistics.median(ckpt), 1),
        "ratio_pct": round(statistics.median(r / c for r, c in zip(raw, ckpt, strict=True))
                           * 100, 1),
    }


def _print(result: dict[str, Any]) -> None:
    m, s = result["machine"], result["sizes"]
    print(f"machine:    {m['cpus']} CPUs, {m['python']}, {m['platform']}")
    print(f"target dir: {m['target_dir']} on {m['fs_type']} ({m['device']} at "
          f"{m['mount_point']})")
    print("            " + ("clones files (reflink): an incremental checkpoint writes only "
                            "the appended memory" if m["clones"] else
                            "no reflink: each checkpoint copies the whole memory file "
                            "(XFS with reflink or btrfs would clone it)"))
    if "stall" in result or "freshness" in result:
        print(f"loop:       {s['episodes']:,} episodes of {s['episode_cpu_s'] * 1e3:g} ms CPU, "
              f"a checkpoint every episode (coalesce), switch interval "
              f"{SWITCH_INTERVAL * 1e3:g} ms; medians of {s['repeats']} run(s)")
    for key, what in (("stall", "time in submit()"), ("freshness", "submit to durable")):
        if key in result:
            print(f"{key} ({what}):")
        for row in result.get(key, []):
            print(f"  {row['memory_entries']:>11,} entries   p50 {row['p50_ms']:9.3f} ms   "
                  f"p99 {row['p99_ms']:9.3f} ms   ({row['checkpoints_written']:.0f} written)")
    if "throughput" in result:
        t = result["throughput"]
        print(f"throughput (one full checkpoint of {t['mib']:.0f} MiB, median of {s['repeats']}):"
              f"\n  raw write+fsync  {t['raw_mib_s']:8.1f} MiB/s\n"
              f"  full checkpoint  {t['checkpoint_mib_s']:8.1f} MiB/s   "
              f"({t['ratio_pct']:.1f} % of raw; submit to durable)")


def _check_plot(out: Path) -> None:
    # Before any measuring: a typo or a missing extra must not cost the user the sweep.
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise SystemExit(f"--plot {out}: give a .png, .svg or .pdf file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("ckptwriter bench --plot needs matplotlib: "
                         "pip install 'ckptwriter[plot]'") from None


def _plot(base: Path, sizes: _Sizes, result: dict[str, Any], out: Path) -> None:
    from . import bench_plot  # matplotlib only when a picture is asked for

    print(f"plot: sweeping intervals {bench_plot.INTERVALS} at memories "
          f"{', '.join(f'{n:,}' for n in sizes.plot_memories)} entries")
    points, floors = bench_plot.sweep(base, sizes.plot_memories, sizes.plot_episodes,
                                      sizes.plot_episode_cpu_s)
    bench_plot.draw(points, floors, result["machine"], sizes.plot_episode_cpu_s, out)
    result["plot"] = {"file": str(out), "disk_floor_ms": {
        str(n): round(f * 1e3, 3) for n, f in floors.items()},
        "points": [asdict(p) for p in points]}
    print(f"plot: wrote {out}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ckptwriter bench", description=(
        "Measure what checkpointing costs on this machine and disk: submit() stall, "
        "freshness (submit to durable) and full-checkpoint throughput."))
    ap.add_argument("--dir", metavar="PATH", default=None,
                    help="directory on the disk to measure (default: a temp dir in the "
                         "current directory)")
    ap.add_argument("--memory-entries", type=int, metavar="N", default=None,
                    help="entries in the large memory (default 1,000,000; 200,000 with "
                         "--quick)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, well under a minute")
    ap.add_argument("--size", choices=sorted(_SIZES), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", metavar="NAME", action="append", choices=BENCHMARKS,
                    help=f"run only these (repeatable): {', '.join(BENCHMARKS)}")
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3)")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write results here")
    ap.add_argument("--plot", metavar="FILE.png", default=None, help=(
        "also sweep checkpoint intervals at a small and a large memory (1,000 and "
        "100,000 entries, 300 episodes of 1.3 ms CPU each: about a minute more) and draw "
        "loop overhead and submit stall against them, with the disk floor (needs "
        "matplotlib: pip install 'ckptwriter[plot]')"))
    return ap


def main(argv: list[str]) -> int:
    """Run ``ckptwriter bench``: measure, print, and write JSON with ``--json``.

    Args:
        argv: the arguments after ``bench``.

    Returns:
        0.

    Raises:
        SystemExit: a bad argument (the message says which).
    """
    args = _parser().parse_args(argv)
    sizes = _SIZES[args.size or ("quick" if args.quick else "full")]
    for flag, value, hint in (
        ("--memory-entries", args.memory_entries,
         "; pass the number of entries your agent's memory reaches"),
        ("--repeats", args.repeats, ""),
    ):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}{hint}")
    sizes = replace(sizes, large_memory=args.memory_entries or sizes.large_memory,
                    repeats=args.repeats or sizes.repeats)
    if args.plot:
        _check_plot(Path(args.plot))
    only = set(args.only or BENCHMARKS)
    base = Path(args.dir) if args.dir else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": _machine(base), "sizes": asdict(sizes)}
    with tempfile.TemporaryDirectory(prefix="ckptwriter-bench-", dir=base) as tmp:
        if only & {"stall", "freshness"}:
            # Measured together, shown as asked.
            rows = _bench_loop(Path(tmp), sizes)
            result |= {key: rows[key] for key in ("stall", "freshness") if key in only}
        if "throughput" in only:
            result["throughput"] = _bench_throughput(Path(tmp), sizes)
        if args.plot:
            _plot(Path(tmp), sizes, result, Path(args.plot))
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
