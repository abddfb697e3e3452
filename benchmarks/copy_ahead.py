"""How the next commit's memory prefix is best copied ahead (storage/local_prepare.py).

Three ways of making a copy of one memory file and waiting until it is on the disk, as
the writer does between commits (``copy_prefix`` in writeback pieces, then
``Writeback.settle``), interleaved round by round:

- ``fresh``: a new file, and the file retention deleted five copies ago unlinked beside
  it (what retention costs where nothing is recycled; ``discard`` mounts pay here);
- ``fallocated``: the same, with the new file's blocks taken in one ``fallocate``;
- ``recycled``: over a file of the same size that is already there (its blocks and its
  cached pages), nothing unlinked: the writer's copy over a deleted checkpoint's file.

Each row: wall time of the copy, its CPU (this thread's, kernel included) and the wait
for the disk after it. ``--busy`` runs a pure-Python loop in another process meanwhile,
as the training loop does. Nothing here is judged: it is the measurement behind the
choices, for your own disk.

Usage: ``python -m benchmarks.copy_ahead [--dir PATH] [--mib 112] [--rounds 5] [--busy]``
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_KEPT = 5
# Pieces of the copy, each written back as soon as it is copied, then all waited for:
# what the writer does (storage/posix_io: Writeback), with the kernel's calls directly.
_PIECE = 7 << 20
_WRITE, _SETTLE = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _copy_in_pieces(src: int, fd: int, nbytes: int) -> float:
    """Copy in written-back pieces; the seconds of the copy (the wait follows)."""
    t0 = time.perf_counter()
    at = 0
    while at < nbytes:
        n = os.copy_file_range(src, fd, min(_PIECE, nbytes - at), at, at)
        _LIBC.sync_file_range(fd, at, n, _WRITE)
        at += n
    return time.perf_counter() - t0


def _copy(src: int, nbytes: int, dst: Path, *, fallocate: bool, overwrite: bool,
          doomed: Path | None) -> tuple[float, float, float]:
    flags = os.O_WRONLY | os.O_CREAT | (0 if overwrite else os.O_TRUNC)
    fd = os.open(dst, flags, 0o644)
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        if fallocate:
            os.posix_fallocate(fd, 0, nbytes)
        _copy_in_pieces(src, fd, nbytes)
        t1, c1 = time.perf_counter(), time.thread_time()
        if doomed is not None and doomed.exists():
            doomed.unlink()
        for at in range(0, nbytes, _PIECE):
            _LIBC.sync_file_range(fd, at, min(_PIECE, nbytes - at), _SETTLE)
        os.fsync(fd)
        return t1 - t0, c1 - c0, time.perf_counter() - t1
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    """Print the median copy, CPU and settle times of each way, in milliseconds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dir", default=".")
    ap.add_argument("--mib", type=int, default=112)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", action="store_true")
    args = ap.parse_args(argv)
    nbytes = args.mib << 20
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory(prefix="copy-ahead-", dir=args.dir) as tmp:
            base = Path(tmp)
            source = base / "source"
            with open(source, "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1 << 20))
                os.fsync(f.fileno())
            src = os.open(source, os.O_RDONLY)
            rows: dict[str, list[tuple[float, float, float]]] = {
                "fresh": [], "fallocated": [], "recycled": []}
            try:
                for i in range(args.rounds + _KEPT):
                    for way in rows:
                        dst = base / f"{way}-{i}"
                        doomed = base / f"{way}-{i - _KEPT}"
                        if way == "recycled" and i >= _KEPT:
                            doomed.rename(dst)  # the deleted file, copied over
                        got = _copy(src, nbytes, dst, fallocate=way == "fallocated",
                                    overwrite=way == "recycled",
                                    doomed=None if way == "recycled" else doomed)
                        if i >= _KEPT:  # the first files fill the set retention keeps
                            rows[way].append(got)
            finally:
                os.close(src)
    finally:
        if busy is not None:
            busy.kill()
    print(f"{args.mib} MiB, {args.rounds} rounds, medians"
          f"{' (a busy process beside it)' if args.busy else ''}:")
    for way, got in rows.items():
        copy, cpu, settle = (statistics.median(x) * 1e3 for x in zip(*got, strict=True))
        print(f"  {way:11s} copy {copy:6.1f} ms  cpu {cpu:6.1f} ms  "
              f"settle {settle:6.1f} ms  total {copy + settle:6.1f} ms")


if __name__ == "__main__":
    main()
