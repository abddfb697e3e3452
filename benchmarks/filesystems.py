"""What one incremental checkpoint costs on each filesystem: ext4, XFS, btrfs, tmpfs.

The performance issue's workload: a 100,000-entry memory (about 11 MB) growing by four
entries per checkpoint, 20 checkpoints through the default writer. For each filesystem:
the commit time (submit to durable, median), the raw copy + fsync of the memory file
beside it (the floor of the guide's format without cloning), whether the filesystem
clones, and the space it allocated per checkpoint (statvfs before and after, synced).

XFS (``mkfs.xfs -m reflink=1``), btrfs and tmpfs are made on loop devices / mounted under
a temp dir, which needs root and xfsprogs/btrfs-progs; a filesystem that cannot be made
is reported as skipped with the reason. ext4 is the directory given (default: cwd).

Usage: ``python -m benchmarks.filesystems [--dir PATH] [--checkpoints 20] [--entries 100000]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from ckptwriter import CheckpointWriter, MemoryLog, Observation, Snapshot
from ckptwriter.bench import clones, disk_floor, filesystem_type

_MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@contextmanager
def _mounted(kind: str, base: Path) -> Iterator[Path]:
    mnt = base / f"mnt-{kind}"
    mnt.mkdir()
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mnt)]
    else:
        if shutil.which(_MKFS[kind][0]) is None:
            raise RuntimeError(f"{_MKFS[kind][0]} not installed")
        image = base / f"{kind}.img"
        with open(image, "wb") as f:
            f.truncate(1 << 30)
        subprocess.run([*_MKFS[kind], str(image)], check=True, capture_output=True)
        cmd = ["mount", "-o", "loop", str(image), str(mnt)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip() or "mount failed")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


async def _commits(root: Path, memory: MemoryLog, n: int) -> tuple[list[float], list[int]]:
    latency, allocated = [], []
    # Keep every checkpoint: with retention the space freed would hide what was allocated.
    async with CheckpointWriter(root) as writer:
        await (await writer.submit(Snapshot(0, 0, "Bench", memory))).wait()
        for ep in range(1, n + 1):
            memory.extend(Observation(content=f"episode {ep} step {i}") for i in range(4))
            before = _used(root)
            result = await (await writer.submit(Snapshot(ep, ep, "Bench", memory))).wait()
            latency.append(result.latency_seconds)
            allocated.append(_used(root) - before)
    return latency, allocated


def measure(path: Path, entries: int, checkpoints: int) -> dict[str, object]:
    """One filesystem's row."""
    memory = MemoryLog()
    memory.extend(Observation(content=f"observation {i} of the episode " + "x" * 70)
                  for i in range(entries))
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        floor = disk_floor(Path(tmp), memory, repeats=5)
        latency, allocated = anyio.run(_commits, Path(tmp) / "checkpoints", memory, checkpoints)
    return {"fs": filesystem_type(path)["fs_type"], "clones": clones(path),
            "memory_mib": memory.nbytes / 2**20, "commit_ms": statistics.median(latency) * 1e3,
            "floor_ms": floor * 1e3,
            "allocated_kib": statistics.median(allocated) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", default=".", help="the ext4 (or other) directory to measure")
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--entries", type=int, default=100_000)
    args = ap.parse_args()
    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)  # as ckptwriter bench and benchmarks.floor do
    rows: list[dict[str, object]] = [measure(target, args.entries, args.checkpoints)]
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ckptwriter-fs-") as tmp:
        for kind in ("xfs", "btrfs", "tmpfs"):
            try:
                with _mounted(kind, Path(tmp)) as mnt:
                    rows.append(measure(mnt, args.entries, args.checkpoints))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                skipped.append(f"{kind}: {exc}")
    print(f"load average {os.getloadavg()[0]:.2f}; {args.entries:,} entries, "
          f"{args.checkpoints} incremental checkpoints of +4 entries, default writer\n")
    print("| filesystem | clones | memory file | commit (submit to durable, median) | "
          "copy + fsync floor | space allocated per checkpoint |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fs']} | {'yes' if r['clones'] else 'no'} | {r['memory_mib']:.1f} MiB | "
              f"{r['commit_ms']:.1f} ms | {r['floor_ms']:.1f} ms | {r['allocated_kib']:.0f} KiB |")
    for s in skipped:
        print(f"skipped {s}")


if __name__ == "__main__":
    main()
