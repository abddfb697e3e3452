"""Readers stay inside the checkpoints directory: planted symlinks, a racing swap, huge files.

"Never read" is proven by recording every directory and file the process opens (``os.open``
results resolved through ``/proc/self/fd``, ``open()`` and directory listings through the
audit hook), so a read relative to a directory descriptor is seen where it really lands.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import fsspec
import pytest

from _fault_util import build_checkpoints, memory_until, snapshot
from _runtime_util import cli
from _s3_util import REMOTE_BACKENDS, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import (
    Action,
    AgentState,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointWriter,
    MemoryLog,
    Snapshot,
    SyncCheckpointWriter,
    UnsafePathError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.storage.dirfd import exchange, open_dir

EP3 = "ep_000003"
# A sparse file this large costs no disk and cannot be read into memory.
HUGE = 15 * 2**40

# -- proof that nothing outside is opened or listed -----------------------------------

_WATCHED: list[str] = []
_TOUCHED: list[str] = []


def _note(path: str) -> None:
    if any(path == w or path.startswith(w + os.sep) for w in _WATCHED):
        _TOUCHED.append(path)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCHED or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if event in ("os.scandir", "os.listdir"):
        _note(os.path.realpath(os.fsdecode(args[0])))
    elif event == "open" and not (isinstance(args[2], int) and args[2] & os.O_NOFOLLOW):
        # Relative to a descriptor, the name alone is passed: counted by _counting_open.
        _note(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory outside the checkpoints dir; what is opened or listed in it is recorded."""
    d = tmp_path / "outside"
    d.mkdir()
    real_open = os.open

    def counting_open(path: Any, flags: int, mode: int = 0o777, *,
                      dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if _WATCHED:
            _note(os.readlink(f"/proc/self/fd/{fd}"))
        return fd

    monkeypatch.setattr(os, "open", counting_open)
    yield d
    _WATCHED.clear()
    _TOUCHED.clear()


def _arm(outside: Path) -> None:
    _TOUCHED.clear()
    _WATCHED[:] = [os.path.realpath(outside)]


def _touched() -> list[str]:
    _WATCHED.clear()
    return list(_TOUCHED)


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    """Checkpoints ep 1..3, latest -> ep_000003."""
    root = tmp_path / "checkpoints"
    build_checkpoints(root, 3, executor="thread")
    return root


def _outside_checkpoint(outside: Path, episode: int = 9) -> Path:
    """A valid checkpoint of another run (ep ``episode``, other memory), as bait."""
    build_checkpoints(outside / "other", episode, pad=7, executor="thread")
    return outside / "other" / f"ep_{episode:06d}"


# -- D4/D5: planted ep_* and best symlinks ----------------------------------------------


def test_verify_of_a_directory_reports_a_symlinked_checkpoint_without_reading_it(
    ckpts: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ckptwriter verify <dir>` says BROKEN for an ep_* symlink and opens nothing outside."""
    bait = _outside_checkpoint(outside)
    (ckpts / "ep_000009").symlink_to(bait)
    _arm(outside)
    assert cli(["verify", str(ckpts)], ckpts) == 1
    assert _touched() == []
    out = capsys.readouterr().out
    assert f"BROKEN  {ckpts / 'ep_000009'}: ep_000009: is a symlink to {bait}; refusing " \
           "to follow it" in out
    assert out.rstrip().endswith("3/4 checkpoints OK, 1 problem(s)")


def test_a_symlinked_checkpoint_named_directly_is_refused(ckpts: Path, outside: Path) -> None:
    """load/verify/resolve of ck/ep_000009 (a planted link): UnsafePathError naming the link."""
    bait = _outside_checkpoint(outside)
    (ckpts / "ep_000009").symlink_to(bait)
    _arm(outside)
    match = (rf"^Checkpoint {ckpts} is broken: ep_000009: is a symlink to {bait}; "
             r"refusing to follow it \(a checkpoint is a real directory")
    for read in (load_checkpoint, verify_checkpoint, resolve_checkpoint):
        with pytest.raises(UnsafePathError, match=match):
            read(ckpts / "ep_000009")
    assert [(i.name, i.problem) for i in list_checkpoints(ckpts) if not i.complete] == [
        ("ep_000009", "not a directory")]
    assert _touched() == []


@pytest.mark.parametrize("name", ["best", "best.json"])
def test_a_hostile_best_is_refused_by_verify_as_by_load(
    ckpts: Path, outside: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """best -> ../outside/ep_000009: verify_checkpoint and `verify` refuse it, nothing read."""
    bait = _outside_checkpoint(outside)
    target = os.path.relpath(bait, ckpts)
    if name == "best":
        (ckpts / "best").symlink_to(target)
    else:
        (ckpts / "best.json").symlink_to(bait / "runtime.json")
    _arm(outside)
    with pytest.raises(UnsafePathError, match=rf"^Checkpoint {ckpts} is broken: {name}: "):
        verify_checkpoint(ckpts / name)
    with pytest.raises(UnsafePathError, match=rf"^Checkpoint {ckpts} is broken: {name}: "):
        load_checkpoint(ckpts / name)
    assert cli(["verify", str(ckpts / name)], ckpts) == 1
    assert _touched() == []
    assert f"BROKEN  {ckpts / name}: {name}: " in capsys.readouterr().out


def test_the_users_own_symlinks_above_the_checkpoints_dir_keep_working(
    ckpts: Path, tmp_path: Path
) -> None:
    """A symlinked checkpoints dir (and a link of the user's to a checkpoint) still load."""
    link = tmp_path / "my-ckpts"
    link.symlink_to(ckpts)
    resume = tmp_path / "resume-here"
    resume.symlink_to(ckpts / EP3)
    for path in (link, link / "latest", link / EP3, resume):
        assert load_checkpoint(path).runtime.episode_index == 3
    for path in (link / "latest", link / EP3, resume):
        assert verify_checkpoint(path).episode_index == 3
    assert [i.complete for i in list_checkpoints(link)] == [True, True, True]


def test_shared_file_check_never_lists_a_symlinked_sibling(
    tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`verify <ckpt>` names the checkpoints sharing a damaged file, never entering a link."""
    ck = tmp_path / "ck"
    mem, state = MemoryLog(), AgentState(policy=b"\0" * 4096)
    with SyncCheckpointWriter(ck, executor="thread") as w:
        for ep in (1, 2):
            mem.append(Action(content=str(ep)))
            w.submit(Snapshot(ep, ep, "A", mem, state=state)).wait()
    shared = ck / "ep_000002" / "state.policy.bin"
    assert shared.stat().st_nlink == 2
    with shared.open("r+b") as f:
        f.write(b"\1")
    (outside / "secret").mkdir()
    (outside / "secret" / "state.policy.bin").write_bytes(b"s")
    (ck / "ep_000009").symlink_to(outside / "secret")
    _arm(outside)
    assert cli(["verify", str(ck / "ep_000002")], tmp_path) == 1
    assert _touched() == []
    assert "state.policy.bin: sha256 does not match runtime.json (shared with ep_000001)" \
        in capsys.readouterr().out


# -- D6: ep_* swapped for a symlink while a reader reads it ----------------------------

_SWAPPER = textwrap.dedent("""
    import os, sys
    from ckptwriter.storage.dirfd import exchange
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        exchange(fd, "ep_000003", ".swap")
""")


def _can_exchange(tmp_path: Path) -> bool:
    (tmp_path / "a").mkdir(parents=True)
    (tmp_path / "b").symlink_to("a")
    fd = open_dir(str(tmp_path))
    try:
        exchange(fd, "a", "b")
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)
    return True


def test_a_checkpoint_swapped_for_a_symlink_while_read_never_yields_the_other_tree(
    ckpts: Path, outside: Path, tmp_path: Path
) -> None:
    """A process swapping latest's ep_* with a link to another run's ep_* (RENAME_EXCHANGE):
    load_checkpoint and verify_checkpoint never return that run's data."""
    if not _can_exchange(tmp_path / "probe"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported on this filesystem")
    bait = _outside_checkpoint(outside, episode=3)
    (ckpts / ".swap").symlink_to(bait)
    ours = memory_until(3).to_jsonl()
    ours_size = verify_checkpoint(ckpts / EP3).files["memory_3.jsonl"].bytes
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(ckpts), "50000000"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == "ready\n"
        loads = verifies = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointFallbackWarning)
            for _ in range(3000):
                try:
                    got = load_checkpoint(ckpts / "latest")
                except CheckpointError:
                    pass  # refused (the link seen), or not found mid-swap: never outside
                else:
                    loads += 1
                    assert got.runtime.episode_index < 3 or got.memory.to_jsonl() == ours
                try:
                    rt = verify_checkpoint(ckpts / "latest")
                except CheckpointError:
                    pass
                else:
                    verifies += 1
                    assert rt.files[rt.memory_snapshot_path].bytes == ours_size
        assert swapper.poll() is None, "the swapper stopped before the reader was done"
    finally:
        swapper.kill()
        swapper.wait()
        if swapper.stdout is not None:
            swapper.stdout.close()
    assert loads
    assert verifies


# -- D7: files far larger than the manifest says ---------------------------------------


def _sparse(path: Path, size: int = HUGE) -> None:
    try:
        os.truncate(path, size)
    except OSError as exc:
        if exc.errno in (errno.EFBIG, errno.EINVAL):
            pytest.skip(f"this filesystem cannot hold a sparse file of {size} bytes")
        raise


def test_a_huge_sparse_memory_file_is_a_size_mismatch_with_fallback(ckpts: Path) -> None:
    """A 15 TB sparse memory file in latest's target: corrupt by size, never read; fallback."""
    _sparse(ckpts / EP3 / "memory_3.jsonl")
    with pytest.raises(CheckpointCorruptError, match=(
            rf"^Checkpoint {ckpts / EP3} is broken: memory_3\.jsonl: size {HUGE} bytes, "
            r"expected \d+ \(appended to\?\)")):
        verify_checkpoint(ckpts / EP3)
    with pytest.warns(CheckpointFallbackWarning, match=(
            rf"^latest points at {EP3}, which is broken \(memory_3\.jsonl: size {HUGE} ")):
        assert load_checkpoint(ckpts / "latest").runtime.episode_index == 2
    info = list_checkpoints(ckpts)[-1]
    assert not info.complete
    assert (info.problem or "").startswith(f"memory_3.jsonl: size {HUGE} bytes, expected ")


def test_a_huge_sparse_runtime_json_is_refused_everywhere(
    ckpts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 15 TB runtime.json: the listing marks it, the writer opens, `verify` exits 1."""
    _sparse(ckpts / "ep_000002" / "runtime.json")
    problem = (f"runtime.json: too large ({HUGE} bytes, more than the 8388608 bytes such a "
               "document may have)")
    with pytest.raises(CheckpointCorruptError, match=rf"^Checkpoint .*ep_000002 is broken: "
                                                     rf"{re.escape(problem)}"):
        load_checkpoint(ckpts / "ep_000002")
    assert [(i.name, i.problem) for i in list_checkpoints(ckpts) if not i.complete] == [
        ("ep_000002", problem)]
    with SyncCheckpointWriter(ckpts, executor="thread") as w:
        assert [c.name for c in w.checkpoints] == ["ep_000001", EP3]
    assert cli(["verify", str(ckpts)], ckpts) == 1
    out = capsys.readouterr().out
    assert f"BROKEN  {ckpts / 'ep_000002'}: {problem}" in out


def test_a_huge_latest_json_falls_back(ckpts: Path) -> None:
    """latest.json of 15 TB (and no latest symlink): invalid, the newest valid one is used."""
    (ckpts / "latest").unlink()
    _sparse(ckpts / "latest.json")
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest\.json is invalid \(too large\)"):
        assert load_checkpoint(ckpts).runtime.episode_index == 3


def test_an_object_larger_than_its_manifest_is_never_fetched_whole(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """On object storage the read asks a range of the recorded size + 1, never the object."""
    root = "memory://reader-safety-huge/checkpoints"

    async def write() -> None:
        async with CheckpointWriter(root, executor="thread") as w:
            await w.submit(snapshot(2, memory_until(2)))
            await w.flush()

    anyio.run(write)
    fs = fsspec.filesystem("memory")
    mem = "/reader-safety-huge/checkpoints/ep_000002/memory_2.jsonl"
    expected = len(fs.cat_file(mem))
    fs.pipe_file(mem, b"\n" * (64 * 2**20))
    fetched: list[tuple[str, Any, Any]] = []
    real = type(fs).cat_file

    def cat_file(self: Any, path: str, start: Any = None, end: Any = None, **kw: Any) -> Any:
        fetched.append((path, start, end))
        return real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(type(fs), "cat_file", cat_file)
    try:
        with pytest.raises(CheckpointCorruptError, match=(
                rf"memory_2\.jsonl: size {64 * 2**20} bytes, expected {expected} "
                r"\(appended to\?\)")):
            verify_checkpoint(f"{root}/ep_000002")
        assert [(s, e) for p, s, e in fetched if p.endswith("memory_2.jsonl")] == [
            (0, expected + 1)]
    finally:
        fs.rm("/reader-safety-huge", recursive=True)


@pytest.fixture(params=REMOTE_BACKENDS)
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh checkpoints location on memory:// and S3 (moto)."""
    return make_backend(str(request.param), tmp_path, request).url


def test_remote_reads_with_a_limit_handle_empty_and_oversized_objects(remote_url: str) -> None:
    """An empty file loads (no unsatisfiable range); an object grown past its record is a
    size mismatch, read as a range of the recorded size + 1."""
    async def write() -> None:
        async with CheckpointWriter(remote_url, executor="thread") as w:
            await w.submit(snapshot(1, memory_until(1), extra_files={"empty.bin": b""}))
            await w.flush()

    anyio.run(write)
    ckpt = f"{remote_url}/ep_000001"
    assert load_checkpoint(ckpt).extra_files["empty.bin"] == b""
    fs, path = fsspec.core.url_to_fs(ckpt)
    fs.pipe_file(f"{path}/empty.bin", b"x" * 1000)
    fs.invalidate_cache()
    with pytest.raises(CheckpointCorruptError, match=(
            r"empty\.bin: size 1000 bytes, expected 0 \(appended to\?\)")):
        verify_checkpoint(ckpt)
