"""The local backend writes only where it holds the lock, and replaces a checkpoint in one step.

- A re-commit of an existing episode swaps the directories (``RENAME_EXCHANGE``): a live
  reader never fails, and a crash after any step leaves ``ep_N`` whole.
- Every write goes through the directory descriptor opened at start: a path component
  swapped for a symlink, or the directory moved, never sends a write anywhere else.
- Leftovers that are symlinks or hold hard links are only unlinked.
- A child forked by the training process does not keep the directory lock.

This module is also a child program (``python test_local_fd_safety.py <command> ...``)
so that crashes and kills are real process deaths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _fault_util import (
    CRASH_EXIT,
    PY,
    FaultStorage,
    build_checkpoints,
    leftovers,
    memory_until,
    snapshot,
    tree_digest,
)
from ckptwriter import (
    CheckpointWriter,
    MemoryLog,
    Observation,
    StorageError,
    SyncCheckpointWriter,
    WriterFailedError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.reader import is_whole
from ckptwriter.storage import LocalStorage, LocalStore
from ckptwriter.storage import local as local_mod

HERE = Path(__file__).resolve()
EP5 = "ep_000005"


@pytest.fixture
def anyio_backend() -> str:
    """One event loop: what is tested here happens in the backend."""
    return "asyncio"


def recommitted(n: int) -> MemoryLog:
    """Episode 5's memory as the n-th re-commit writes it (n = 0: the first commit)."""
    log = memory_until(5)
    log.extend(Observation(content=f"re-commit {i}") for i in range(1, n + 1))
    return log


def _no_exchange(*args: object) -> None:
    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


# -- a live reader while the same episode is committed again and again -----------------


def _child_reader(root: str, stop: str, min_loads: str, target: str = "latest") -> None:
    """Load <root>/<target> until told to stop (and at least min_loads times); report."""
    from ckptwriter import CheckpointFallbackWarning

    loads, errors, fallbacks, seen = 0, [], 0, set()
    base = len(memory_until(5))
    while loads < int(min_loads) or not os.path.exists(stop):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ck = load_checkpoint(f"{root}/{target}")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                ck = None
        fallbacks += sum(issubclass(w.category, CheckpointFallbackWarning) for w in caught)
        loads += 1
        if ck is not None:
            n = len(ck.memory) - base
            # The memory must be exactly one of the contents a commit wrote.
            if ck.memory.to_jsonl() != recommitted(n).to_jsonl():
                errors.append(f"load {loads}: memory matches no committed content")
            seen.add(n)
        if loads == 1:
            Path(stop + ".ready").touch()
    print(json.dumps({"loads": loads, "errors": errors[:5], "n_errors": len(errors),
                      "fallbacks": fallbacks, "distinct": len(seen), "max": max(seen)}))


def _slow_to_move_a_checkpoint_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """Renaming ep_5 away takes 5 ms more (a loaded NFS server), in this process."""
    real = os.rename

    def rename(src: str, dst: str, **kw: int) -> None:
        real(src, dst, **kw)
        if os.path.basename(src) == EP5:
            time.sleep(0.005)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize(("executor", "target"), [
    pytest.param("thread", "latest", id="thread-slow-rename"),
    pytest.param("process", "latest", id="process"),
    # Named directly, not through latest: a read that began on the old copy and met the
    # new one's files reads again (found and fixed: 11 errors in 800 loads).
    pytest.param("process", EP5, id="process-named"),
])
def test_live_reader_never_fails_while_an_episode_is_recommitted(
    tmp_path: Path, executor: str, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader polling ep 5 while it is re-committed 200 times: no error, no fallback."""
    root, stop = tmp_path / "ck", tmp_path / "stop"
    commits = 200
    if executor == "thread":
        # Were ep_5 ever renamed away (not swapped), readers would see it missing.
        _slow_to_move_a_checkpoint_away(monkeypatch)
    with SyncCheckpointWriter(root, keep_last=1, executor=executor) as w:
        w.submit(snapshot(5, recommitted(0))).wait()
        reader = subprocess.Popen([PY, str(HERE), "reader", str(root), str(stop), "300", target],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(f"{stop}.ready"):
                assert reader.poll() is None, reader.communicate()
                assert time.monotonic() < deadline, "the reader never loaded once"
                time.sleep(0.005)
            log = recommitted(0)
            for n in range(1, commits + 1):
                log.append(Observation(content=f"re-commit {n}"))
                w.submit(snapshot(5, log), replace=True).wait()
        finally:
            stop.touch()
            out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    report = json.loads(out)
    print(report)
    assert (report["n_errors"], report["fallbacks"]) == (0, 0), report
    assert report["max"] <= commits
    assert report["distinct"] > 1  # the reader did overlap the re-commits
    assert leftovers(root) == []
    assert len(load_checkpoint(root).memory) == len(recommitted(commits))


def test_recommit_without_a_swap_falls_back_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where RENAME_EXCHANGE is refused (EINVAL: NFS, FUSE), a re-commit still replaces ep_N."""
    monkeypatch.setattr(local_mod, "exchange", _no_exchange)
    root = tmp_path / "ck"
    with SyncCheckpointWriter(root, keep_last=1, executor="thread") as w:
        for n in range(3):
            w.submit(snapshot(5, recommitted(n)), replace=n > 0).wait()
    assert leftovers(root) == []
    assert load_checkpoint(root).memory.to_jsonl() == recommitted(2).to_jsonl()


# -- a re-commit killed right after each of its steps ----------------------------------

# Steps of a re-commit; before "renamed" ep_5 is the old copy, from it on the new one.
RECOMMIT_REACHED = [s for s in LocalStorage.STEPS if s not in {"trash_renamed", "deleted"}]
RECOMMIT_REACHED += ["old_copy_trashed", "old_copy_removed"]
_NEW_FROM = RECOMMIT_REACHED.index("renamed")
CASES = [f"{step}:{keep}:swap" for step in RECOMMIT_REACHED for keep in (1, 3)]
CASES += [f"{step}:1:fallback" for step in ("old_moved_aside", "renamed", "old_copy_trashed")]


class _DieAt(LocalStorage):
    """Dies (os._exit, no cleanup) right after one step."""

    def __init__(self, root: str, step: str) -> None:
        super().__init__(root)
        self.die_at = step

    def _step(self, name: str) -> None:
        if name == self.die_at:
            os._exit(CRASH_EXIT)


def _one_crash(root: str, step: str, keep: int, fallback: bool) -> None:
    if fallback:
        local_mod.exchange = _no_exchange  # type: ignore[assignment]
    with SyncCheckpointWriter(root, keep_last=keep, executor="thread") as w:
        for ep in range(1, 6):
            w.submit(snapshot(ep, recommitted(0) if ep == 5 else memory_until(ep))).wait()
    # A second writer on the same directory commits episode 5 again (a resume in place
    # with checkpoint_on_start, a retry), with other contents.
    with SyncCheckpointWriter(storage=_DieAt(root, step), keep_last=keep) as w:
        w.submit(snapshot(5, recommitted(1)), replace=True).wait()


def _child_recommit_crashes(base: str, *cases: str) -> None:
    """Fork one child per case (imports paid once); report each exit status."""
    pids = {}
    for case in cases:
        step, keep, mode = case.split(":")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                _one_crash(f"{base}/{case.replace(':', '-')}", step, int(keep),
                           mode == "fallback")
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids[case] = pid
    print(json.dumps({c: os.waitstatus_to_exitcode(os.waitpid(p, 0)[1])
                      for c, p in pids.items()}))


@pytest.fixture(scope="module")
def recommit_crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case's directory, its re-commit killed right after the step it names."""
    base = tmp_path_factory.mktemp("recommit")
    res = subprocess.run([PY, str(HERE), "recommit-crashes", str(base), *CASES],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    codes = json.loads(res.stdout)
    assert codes == dict.fromkeys(CASES, CRASH_EXIT), res.stderr
    return {c: base / c.replace(":", "-") for c in CASES}


def _expected(case: str) -> MemoryLog:
    step, _, mode = case.split(":")
    if mode == "fallback" and step == "old_moved_aside":
        return recommitted(0)
    return recommitted(1 if RECOMMIT_REACHED.index(step) >= _NEW_FROM else 0)


def _assert_episode_5_whole(root: Path, memory: MemoryLog, keep: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # latest must be usable as it is: no fallback
        loaded = load_checkpoint(root / "latest")
    assert loaded.runtime.episode_index == 5
    assert loaded.memory.to_jsonl() == memory.to_jsonl()
    assert resolve_checkpoint(root / "latest") == root / EP5
    assert [i.name for i in list_checkpoints(root) if i.complete] == [
        f"ep_{ep:06d}" for ep in range(6 - keep, 6)
    ]


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith(":swap")])
def test_recommit_killed_after_any_step_leaves_ep_n_whole(
    recommit_crashes: dict[str, Path], case: str
) -> None:
    """A re-commit killed after any step leaves ep_5 whole (old or new) and latest loadable."""
    _assert_episode_5_whole(recommit_crashes[case], _expected(case), int(case.split(":")[1]))


@pytest.mark.parametrize("case", CASES)
def test_recommit_killed_after_any_step_next_start_cleans_up(
    recommit_crashes: dict[str, Path], case: str
) -> None:
    """The next writer start removes the leftovers (or puts the old copy back) and ep 5 loads."""
    root = recommit_crashes[case]
    with SyncCheckpointWriter(root, executor="thread"):
        pass
    assert leftovers(root) == []
    _assert_episode_5_whole(root, _expected(case), int(case.split(":")[1]))


# -- writes only where the lock is held ------------------------------------------------


@contextlib.contextmanager
def _locked_other_run(path: Path) -> Iterator[dict[str, tuple[int, str, int]]]:
    """Another run's checkpoints dir, its writer alive (lock held); yields its digest."""
    build_checkpoints(path, 2, executor="thread")
    with SyncCheckpointWriter(path, executor="thread"):
        yield tree_digest(path)


def _swap_for_symlink(real: Path, moved: Path, to: Path) -> Callable[[str], None]:
    def swap(step: str) -> None:
        os.rename(real, moved)
        os.symlink(to, real)

    return swap


def test_parent_swapped_for_a_symlink_mid_commit_never_writes_into_another_run(
    tmp_path: Path,
) -> None:
    """A path component swapped for a symlink to another run's locked dir: that dir stays intact."""
    runs, other = tmp_path / "runs", tmp_path / "other"
    root = runs / "a" / "ck"
    with _locked_other_run(other / "a" / "ck") as before:
        storage = FaultStorage(root, step="memory_written", episode=2,
                               action=_swap_for_symlink(runs, tmp_path / "runs.moved", other))
        with SyncCheckpointWriter(storage=storage, keep_last=1, on_error="warn") as w:
            w.submit(snapshot(1, memory_until(1))).wait()
            # Swapped half-way through: the rest of this commit (files, rename, latest,
            # deleting ep 1) still goes where the lock is held.
            w.submit(snapshot(2, memory_until(2))).wait()
            with pytest.raises(WriterFailedError, match=(
                rf"^checkpoint for episode 3 was not written: checkpoint_dir {root} is no "
                r"longer the directory this writer locked when it started \(it was moved or "
                r"replaced, or a component of the path now leads elsewhere\) while writing "
                rf"checkpoint {root}/ep_000003; nothing was written there: put the directory "
                r"back, or restart the run to write where checkpoint_dir points now$"
            )):
                w.submit(snapshot(3, memory_until(3))).wait()
        assert tree_digest(other / "a" / "ck") == before
    held = tmp_path / "runs.moved" / "a" / "ck"
    assert [i.name for i in list_checkpoints(held)] == ["ep_000002"]
    assert load_checkpoint(held / "latest").runtime.episode_index == 2
    assert leftovers(held) == []


def test_symlinked_checkpoint_dir_retargeted_mid_run_keeps_writing_where_locked(
    tmp_path: Path,
) -> None:
    """checkpoint_dir -> run A, retargeted to run B (locked) mid-commit: B is untouched."""
    a, b, link = tmp_path / "a", tmp_path / "b", tmp_path / "ck"
    a.mkdir()
    link.symlink_to(a)

    def retarget(step: str) -> None:
        os.symlink(b, tmp_path / "ck.new")
        os.replace(tmp_path / "ck.new", link)

    with _locked_other_run(b) as before:
        storage = FaultStorage(link, step="tmp_created", episode=2, action=retarget)
        with SyncCheckpointWriter(storage=storage, keep_last=1) as w:
            for ep in (1, 2, 3):
                w.submit(snapshot(ep, memory_until(ep))).wait()
        assert tree_digest(b) == before
    assert [i.name for i in list_checkpoints(a)] == ["ep_000003"]
    assert load_checkpoint(a).runtime.episode_index == 3


@pytest.mark.anyio
@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_checkpoint_dir_replaced_by_another_directory_is_a_clear_error(
    tmp_path: Path, executor: str
) -> None:
    """The dir moved away and a new one made at its path: refused, nothing written in either."""
    root, moved = tmp_path / "c", tmp_path / "moved"
    async with CheckpointWriter(root, on_error="warn", executor=executor) as w:
        await (await w.submit(snapshot(1, memory_until(1)))).wait()
        os.rename(root, moved)
        root.mkdir()
        h = await w.submit(snapshot(2, memory_until(2)))
        with pytest.raises(WriterFailedError, match=(
            rf"^checkpoint for episode 2 was not written: checkpoint_dir {root} is no longer "
            r"the directory this writer locked when it started"
        )):
            await h.wait()
    assert os.listdir(root) == []
    assert [i.name for i in list_checkpoints(moved)] == ["ep_000001"]


# -- leftovers that are links ----------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid checkpoints dir outside the one under test (episodes 1-5)."""
    d = tmp_path / "outside"
    build_checkpoints(d, 5, executor="thread")
    return d


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_leftover_symlinks_are_unlinked_never_followed(
    tmp_path: Path, outside: Path, executor: str
) -> None:
    """.replaced-/.tmp-/.trash- symlinks (to a checkpoint, a dir, nowhere) are only unlinked."""
    root = tmp_path / "ck"
    build_checkpoints(root, 1, executor="thread")
    (root / ".replaced-ep_000005-0badc0de").symlink_to(outside / EP5)
    (root / ".replaced-ep_000006-0badc0de").symlink_to(tmp_path / "nowhere")
    (root / ".tmp-ep_000002-0badc0de").symlink_to(outside)
    (root / ".trash-ep_000004-0badc0de").symlink_to(outside / "ep_000004")
    before = tree_digest(outside)
    with SyncCheckpointWriter(root, executor=executor):
        pass
    assert leftovers(root) == []
    assert [i.name for i in list_checkpoints(root)] == ["ep_000001"]
    assert tree_digest(outside) == before


def test_leftover_symlinks_are_never_checked_as_checkpoints(tmp_path: Path, outside: Path) -> None:
    """Start-up never asks whether a symlinked .replaced-* is whole (never opens or hashes it)."""
    root = tmp_path / "ck"
    build_checkpoints(root, 1, executor="thread")
    (root / ".replaced-ep_000005-0badc0de").symlink_to(outside / EP5)
    asked: list[str] = []

    def recording(path: str) -> bool:
        asked.append(path)
        return is_whole(LocalStore(), path)

    storage = LocalStorage(root)
    storage.open(recording)
    storage.close()
    assert asked == []
    assert not os.path.lexists(root / EP5)


def test_replaced_entry_swapped_for_a_symlink_after_its_check_is_not_restored(
    tmp_path: Path, outside: Path
) -> None:
    """A .replaced-* dir swapped for a link to outside after its check never becomes ep_*."""
    root = tmp_path / "ck"
    build_checkpoints(root, 5, executor="thread")
    entry = root / ".replaced-ep_000005-0badc0de"
    os.rename(root / EP5, entry)
    before = tree_digest(outside)

    def swapping(path: str) -> bool:
        whole = is_whole(LocalStore(), path)
        # Right after the check said yes, before the rename that puts it back.
        os.rename(entry, tmp_path / "stash")
        entry.symlink_to(outside / EP5)
        return whole

    storage = LocalStorage(root)
    storage.open(swapping)
    storage.close()
    assert not os.path.islink(root / EP5)
    assert tree_digest(outside) == before
    assert leftovers(root) == []


def test_hard_links_in_leftovers_never_write_the_shared_file(tmp_path: Path) -> None:
    """Hard links planted in leftovers are unlinked; the outside file keeps bytes and mtime."""
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"keep me\n")
    os.utime(precious, ns=(1_000_000_000, 1_000_000_000))
    root = tmp_path / "ck"
    build_checkpoints(root, 1, executor="thread")
    for leftover, name in [(".tmp-ep_000002-0badc0de", "memory_2.jsonl"),
                           (".trash-ep_000001-0badc0de", "agent.json"),
                           (".replaced-ep_000009-0badc0de", "runtime.json")]:
        (root / leftover).mkdir()
        os.link(precious, root / leftover / name)
    with SyncCheckpointWriter(root, executor="thread") as w:
        w.submit(snapshot(2, memory_until(2))).wait()
    assert leftovers(root) == []
    assert precious.read_bytes() == b"keep me\n"
    st = os.stat(precious)
    assert (st.st_mtime_ns, st.st_nlink) == (1_000_000_000, 1)
    verify_checkpoint(root / "ep_000002")


# -- forks and descriptors -------------------------------------------------------------


def _child_fork_holder(root: str) -> None:
    """Open a writer (thread executor), fork a long-lived worker, report its pid, wait."""
    w = SyncCheckpointWriter(root, executor="thread")
    w.__enter__()
    w.submit(snapshot(1, memory_until(1))).wait()
    if os.fork() == 0:  # pragma: no cover - the forked worker (a data loader)
        # Python code runs in the child only after the fork hooks did: from now on the
        # worker holds no copy of the lock (before this instant it briefly does).
        print(json.dumps({"worker": os.getpid()}), flush=True)
        time.sleep(120)
        os._exit(0)
    time.sleep(120)


def test_forked_worker_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path: Path) -> None:
    """kill -9 of a thread-executor run whose forked worker lives on: the next writer opens."""
    root = tmp_path / "ck"
    proc = subprocess.Popen([PY, str(HERE), "fork-holder", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    assert line, proc.communicate(timeout=30)
    worker = int(json.loads(line)["worker"])
    try:
        proc.kill()
        proc.wait(timeout=30)  # not communicate(): the worker holds the pipes open
        os.kill(worker, 0)  # the worker is still alive
        with SyncCheckpointWriter(root, executor="thread") as w:
            w.submit(snapshot(2, memory_until(2))).wait()
        os.kill(worker, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert load_checkpoint(root).runtime.episode_index == 2


def _descriptors_under(root: Path) -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target == str(root) or target.startswith(f"{root}/"):
                out[int(name)] = target
    return out


def test_every_descriptor_the_backend_holds_is_close_on_exec(tmp_path: Path) -> None:
    """The directory and lock descriptors (and a temp dir's, mid-commit) are O_CLOEXEC."""
    root = tmp_path / "ck"
    seen: list[tuple[str, int]] = []

    def inspect(step: str = "") -> None:
        seen.extend((target, fcntl.fcntl(fd, fcntl.F_GETFD))
                    for fd, target in _descriptors_under(root).items())

    storage = FaultStorage(root, step="files_written", episode=1, action=inspect)
    with SyncCheckpointWriter(storage=storage) as w:
        inspect()
        w.submit(snapshot(1, memory_until(1))).wait()
    assert {Path(t).name for t, _ in seen} >= {"ck", ".lock"}
    assert any(".tmp-ep_000001-" in t for t, _ in seen)
    assert all(flags & fcntl.FD_CLOEXEC for _, flags in seen), seen
    assert _descriptors_under(root) == {}


def test_storage_used_before_open_is_a_clear_error(tmp_path: Path) -> None:
    """A LocalStorage that was never opened refuses to commit instead of writing by path."""
    with pytest.raises(StorageError, match=(
        rf"^the checkpoints directory {tmp_path / 'ck'} is not open; open the writer "
        r"before committing$"
    )):
        LocalStorage(tmp_path / "ck").begin("ep_000001")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {
        "reader": _child_reader,
        "recommit-crashes": _child_recommit_crashes,
        "fork-holder": _child_fork_holder,
    }[cmd](*rest)


def test_replaced_entry_of_another_episode_is_not_restored(tmp_path: Path) -> None:
    """A whole checkpoint of ep 7 planted as .replaced-ep_000005-* never becomes ep_000005
    (readers would reject it as corrupt); it is removed like any other leftover."""
    root, src = tmp_path / "ck", tmp_path / "src"
    build_checkpoints(root, 1, executor="thread")
    build_checkpoints(src, 7, executor="thread")
    os.rename(src / "ep_000007", root / ".replaced-ep_000005-0badc0de")
    with SyncCheckpointWriter(root, executor="thread"):
        pass
    assert leftovers(root) == []
    assert [i.name for i in list_checkpoints(root)] == ["ep_000001"]
