"""Several processes on the same checkpoints: concurrent resumes, the writer lock, a
reader racing a live writer that deletes old checkpoints."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from _fault_util import (
    HERE,
    PY,
    build_checkpoints,
    kill_group,
    memory_until,
    snapshot,
    tree_digest,
)
from ckptwriter import (
    CheckpointWriter,
    DirectoryLockedError,
    load_checkpoint,
    verify_checkpoint,
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run the writer under both event loops anyio supports."""
    return str(request.param)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, str(HERE), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)


def test_two_runs_resume_same_checkpoint_at_once(tmp_path: Path) -> None:
    """Two processes resuming one checkpoint at the same moment both succeed; it stays as it was."""
    source = tmp_path / "run0" / "checkpoints"
    build_checkpoints(source, 3)
    before = tree_digest(source)
    go = tmp_path / "go"
    dests = [tmp_path / f"run{i}" / "checkpoints" for i in (1, 2)]
    procs = [_spawn("resume", str(source / "latest"), str(d), str(go)) for d in dests]
    try:
        for d in dests:
            _wait_for(Path(str(d) + ".ready"))
        go.touch()  # both are past start-up: release them together
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out) == {"resumed_at": 3, "entries": 8 * 4}
    for d in dests:
        loaded = load_checkpoint(d)
        assert loaded.runtime.episode_index == 8
        assert loaded.runtime.resumed_from == str(source / "ep_000003")
        assert loaded.memory.to_jsonl() == memory_until(8).to_jsonl()
    assert tree_digest(source) == before


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A live writer process owning tmp_path/c (killed at teardown if still alive)."""
    root = tmp_path / "c"
    proc = _spawn("hold-lock", str(root))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == "ready\n", proc.stderr.read() if proc.stderr else ""
    yield root, proc
    if proc.poll() is None:
        kill_group(proc)


@pytest.mark.anyio
async def test_second_writer_refused_while_first_alive(
    lock_holder: tuple[Path, subprocess.Popen[str]]
) -> None:
    """A second writer on a directory a live process writes to is refused, naming the owner."""
    root, _ = lock_holder
    with pytest.raises(DirectoryLockedError, match=(
        rf"^Checkpoint directory {root} is locked by another writer \(pid \d+ on .+\)\. "
        r"Only one writer may own a checkpoints directory: stop the other run or use another "
        r"checkpoint_dir\.$"
    )):
        async with CheckpointWriter(root):
            pass
    verify_checkpoint(root / "ep_000001")


@pytest.mark.anyio
async def test_stale_lock_of_killed_writer_is_recovered(
    lock_holder: tuple[Path, subprocess.Popen[str]]
) -> None:
    """Once the owner is killed with SIGKILL, a new writer takes the directory over."""
    root, proc = lock_holder
    owner = _lock_owner(root)  # the run itself or its writer process
    kill_group(proc)
    assert proc.returncode == -9
    # The writer process dies with the run (PR_SET_PDEATHSIG), releasing the flock.
    _wait_gone(owner)
    log = memory_until(2)
    async with CheckpointWriter(root) as w:
        await (await w.submit(snapshot(2, log))).wait()
    assert load_checkpoint(root).memory.to_jsonl() == log.to_jsonl()
    verify_checkpoint(root / "ep_000001")


def _lock_owner(root: Path) -> int:
    return int((root / ".lock").read_text().split()[1])


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 120  # a hang guard: it is gone in milliseconds
    while _state(pid) not in ("Z", "gone"):
        assert time.monotonic() < deadline, f"writer process {pid} outlived its run"
        time.sleep(0.005)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"


def test_reader_racing_live_writer_with_retention(tmp_path: Path) -> None:
    """Loading latest while another process writes and deletes (keep_last=1) never fails."""
    root = tmp_path / "c"
    build_checkpoints(root, 1)
    writer = subprocess.Popen([PY, "-c", _LIVE_WRITER, str(root)], stderr=subprocess.PIPE,
                              text=True, cwd=HERE.parent)
    seen: list[int] = []
    try:
        # Bounded by work: read until latest has moved (and the old target was deleted)
        # 15 times; the deadline only catches a writer that stopped moving it.
        deadline = time.monotonic() + 300
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning would fail the test
            while len(set(seen)) < 15 and time.monotonic() < deadline and writer.poll() is None:
                loaded = load_checkpoint(root)
                ep = loaded.runtime.episode_index
                assert loaded.memory.to_jsonl() == memory_until(ep).to_jsonl()
                seen.append(ep)
                time.sleep(0.0005)  # leave the writer a core: the test has two
    finally:
        kill_group(writer)
    assert len(set(seen)) >= 15, "the writer did not move latest while the reader read"
    assert seen == sorted(seen)


# The live writer: keep_last=1 so every new checkpoint deletes the one readers just found.
_LIVE_WRITER = """
import sys, anyio
from _fault_util import episode_entries, memory_until, snapshot
from ckptwriter import CheckpointWriter
async def main():
    log = memory_until(1)
    async with CheckpointWriter(sys.argv[1], keep_last=1, fsync=False, executor="thread") as w:
        for ep in range(2, 100000):
            log.extend(episode_entries(ep))
            await (await w.submit(snapshot(ep, log))).wait()
anyio.run(main)
"""
