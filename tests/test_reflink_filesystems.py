"""Reflink, proven: on XFS and btrfs an incremental checkpoint clones its memory prefix.

Each test makes a real filesystem in an image file, mounts it on a loop device and writes
checkpoints into it through the public writer. Two things are checked on the filesystem
itself, not on the writer's own counters: the new memory file's prefix extents are the
previous file's (FIEMAP reports them shared, at the same physical offsets), and the space
the filesystem allocates per incremental checkpoint is the appended delta plus at most
1 MiB. Mounting needs root and the mkfs tools (`.ci/run` installs xfsprogs and
btrfs-progs); elsewhere the tests skip and say why.
"""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks.machine import machine_info

from _fault_util import mounted_tmpfs
from ckptwriter import CheckpointWriter, MemoryLog, Observation, Snapshot
from ckptwriter.bench import clones

pytestmark = pytest.mark.anyio

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_SHARED = 0x2000
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 res.
_MIB = 1 << 20

_MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def extents(path: Path, max_extents: int = 512) -> list[tuple[int, int, int, int]]:
    """(logical, physical, length, flags) of each extent of ``path``, from FIEMAP."""
    buf = array.array("B", _HEADER.pack(0, 2**64 - 1, _FIEMAP_FLAG_SYNC, 0, max_extents, 0)
                      + bytes(_EXTENT.size * max_extents))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf, True)
    mapped = _HEADER.unpack_from(buf, 0)[3]
    out = []
    for i in range(mapped):
        logical, physical, length, _, _, flags, *_ = _EXTENT.unpack_from(
            buf, _HEADER.size + i * _EXTENT.size)
        out.append((logical, physical, length, flags))
    return out


def used_bytes(path: Path) -> int:
    """Bytes the filesystem holding ``path`` has allocated, after a sync."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        os.sync()
        st = os.fstatvfs(fd)
    finally:
        os.close(fd)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture(params=["xfs", "btrfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A freshly made, mounted XFS (reflink=1) or btrfs; skipped where that cannot be."""
    kind = request.param
    mkfs = _MKFS[kind]
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} loop device needs root")
    if shutil.which(mkfs[0]) is None:
        pytest.skip(f"{mkfs[0]} is not installed (apt-get install "
                    f"{'xfsprogs' if kind == 'xfs' else 'btrfs-progs'})")
    image, mnt = tmp_path / f"{kind}.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 * _MIB)
    made = subprocess.run([*mkfs, str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"{mkfs[0]} failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {kind} loop device here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _memory(n: int) -> MemoryLog:
    mem = MemoryLog()
    mem.extend(Observation(content=f"observation {i} " + "x" * 80) for i in range(n))
    return mem


@pytest.mark.parametrize(("executor", "on_backlog"), [
    ("process", "block"), ("thread", "block"), ("process", "coalesce"), ("thread", "coalesce")])
async def test_incremental_checkpoint_clones_the_prefix(
        reflink_fs: Path, executor: str, on_backlog: str) -> None:
    """ep 3's memory file shares ep 2's extents for the prefix; only the delta is new.
    Nothing is copied ahead of a commit (ext4's way): the commit's clone costs nothing."""
    root = reflink_fs / "checkpoints"
    mem = _memory(80_000)  # about 8 MiB: many blocks, so sharing is unmistakable
    allocated: list[int] = []
    deltas: list[int] = []
    prepared: list[float] = []
    async with CheckpointWriter(root, executor=executor,  # type: ignore[arg-type]
                                on_backlog=on_backlog) as w:  # type: ignore[arg-type]
        for ep in (1, 2, 3):
            before_bytes = mem.nbytes
            mem.extend(Observation(content=f"ep {ep} step {i}") for i in range(200))
            before = used_bytes(reflink_fs)
            result = await (await w.submit(Snapshot(ep, ep, "A", mem))).wait()
            prepared.append(result.prepare_seconds)
            allocated.append(used_bytes(reflink_fs) - before)
            deltas.append(mem.nbytes - before_bytes)
    assert prepared == [0.0, 0.0, 0.0]
    assert [n for n in os.listdir(root) if n.startswith(".tmp-")] == []

    prev = extents(root / "ep_000002" / "memory_2.jsonl")
    new = extents(root / "ep_000003" / "memory_3.jsonl")
    prefix = (root / "ep_000002" / "memory_2.jsonl").stat().st_size
    block = os.statvfs(root).f_bsize
    # Every whole block of the previous file is in the new file at the same physical
    # place, and flagged shared: cloned, not copied.
    cloned = {(lo, ph, ln) for lo, ph, ln, _ in prev if lo + ln <= prefix // block * block}
    assert cloned, prev
    assert cloned <= {(lo, ph, ln) for lo, ph, ln, _ in new}, (prev, new)
    assert all(fl & _FIEMAP_EXTENT_SHARED for lo, ph, ln, fl in new
               if (lo, ph, ln) in cloned), new
    # The filesystem allocated the delta (plus small files and metadata), not the file.
    for got, delta in zip(allocated[1:], deltas[1:], strict=True):
        assert got <= delta + _MIB, (allocated, deltas, prefix)
    assert allocated[0] >= prefix // 2  # the first checkpoint really wrote the memory


def test_bench_says_the_filesystem_clones(reflink_fs: Path) -> None:
    """`ckptwriter bench` and `make bench` report reflink where the filesystem has it."""
    assert clones(reflink_fs) is True
    assert machine_info(reflink_fs)["clones"] is True
    assert not [p for p in reflink_fs.iterdir() if p.name.startswith(".ckptwriter-clone-")]


def test_bench_says_tmpfs_does_not_clone(tmp_path: Path) -> None:
    """tmpfs has no reflink: the check says so instead of guessing from the name."""
    with mounted_tmpfs(tmp_path / "t", "8m") as mnt:
        assert clones(mnt) is False
