"""Crash consistency of the commit protocol: a fault right after every step.

Each step of ``LocalStorage.STEPS`` gets a real process death (``os._exit`` in a child
interpreter, no cleanup runs) and an I/O error; then the test reads the directory the
way ``resume_from`` does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anyio
import pytest

from _fault_util import (
    CRASH_EXIT,
    HERE,
    PY,
    FaultStorage,
    episode_entries,
    kill_wholly,
    leftovers,
    memory_until,
    raise_eio,
    record_protocol,
    snapshot,
    writer_process_pid,
)
from ckptwriter import (
    CheckpointWriter,
    MemoryLog,
    WriterFailedError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.storage import LocalStorage

STEPS = LocalStorage.STEPS
# Steps of the third checkpoint after which `latest` already names it.
AFTER_POINTER = {"latest_link_replaced", "latest_json_replaced", "pointer_synced",
                 "trash_renamed", "deleted"}
RETENTION_STEPS = {"trash_renamed", "deleted"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run the writer under both event loops anyio supports."""
    return str(request.param)


def _expected_episode(step: str) -> int:
    return 3 if step in AFTER_POINTER else 2


def _assert_reader_sees(root: Path, episode: int) -> None:
    """What resume_from sees: exactly ``episode``, complete, with the right memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback needed: latest must be valid
        loaded = load_checkpoint(root)
    assert loaded.runtime.episode_index == episode
    assert loaded.memory.to_jsonl() == memory_until(episode).to_jsonl()
    assert resolve_checkpoint(root / "latest") == root / f"ep_{episode:06d}"


def _assert_latest_not_dangling(root: Path) -> None:
    target = os.readlink(root / "latest")
    verify_checkpoint(root / target)


def _assert_no_incomplete(root: Path) -> None:
    bad = [(i.name, i.problem) for i in list_checkpoints(root) if not i.complete]
    assert bad == []


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One child per step (all started at once), each killed by os._exit after that step."""
    import subprocess

    base = tmp_path_factory.mktemp("crashes")
    out: dict[str, Path] = {}
    procs: list[tuple[str, subprocess.Popen[str]]] = []
    for step in STEPS:
        root = base / step
        out[step] = root
        procs.append((step, subprocess.Popen(
            [PY, str(HERE), "crash", str(root), step, "exit"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )))
    for step, p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == CRASH_EXIT, f"{step}: child did not crash as planned: {err}"
    return out


@pytest.mark.parametrize("step", STEPS)
def test_exit_after_step_reader_sees_previous_or_new(crashed: dict[str, Path], step: str) -> None:
    """A process death right after a commit step leaves latest on a complete checkpoint."""
    _assert_reader_sees(crashed[step], _expected_episode(step))


@pytest.mark.parametrize("step", STEPS)
def test_exit_after_step_latest_never_dangles(crashed: dict[str, Path], step: str) -> None:
    """After a crash at any step, the latest symlink names a verified checkpoint."""
    _assert_latest_not_dangling(crashed[step])


@pytest.mark.parametrize("step", STEPS)
def test_exit_after_step_no_incomplete_checkpoint(crashed: dict[str, Path], step: str) -> None:
    """After a crash at any step, every ep_* directory is complete."""
    _assert_no_incomplete(crashed[step])


@pytest.mark.parametrize("step", STEPS)
def test_exit_after_step_earlier_checkpoints_survive(
    crashed: dict[str, Path], step: str
) -> None:
    """A crash never damages ep_000002; ep_000001 only goes by retention, after ep 3 is latest."""
    root = crashed[step]
    verify_checkpoint(root / "ep_000002")
    if step in {"trash_renamed", "deleted"}:
        assert not (root / "ep_000001").exists()
    else:
        verify_checkpoint(root / "ep_000001")


@pytest.mark.anyio
@pytest.mark.parametrize(("step", "executor"), [
    *[pytest.param(s, "thread", id=s) for s in STEPS],
    # The writer process runs the same LocalStorage.open; one spot check each way.
    pytest.param("tmp_dir_synced", "process", id="process-tmp_dir_synced"),
    pytest.param("trash_renamed", "process", id="process-trash_renamed"),
])
async def test_exit_after_step_restart_cleans_and_continues(
    crashed: dict[str, Path], step: str, executor: str, tmp_path: Path
) -> None:
    """The next writer removes .tmp-*/.trash-* leftovers and rewrites episode 3 cleanly.

    Episode 3 may be there (the crash came after its rename): rewriting it is asked for.
    """
    import shutil

    root = tmp_path / "ckpts"
    shutil.copytree(crashed[step], root, symlinks=True)
    log = memory_until(3)
    async with CheckpointWriter(root, keep_last=2, executor=executor) as w:
        assert leftovers(root) == []
        await (await w.submit(snapshot(3, log), replace=True)).wait()
        log.extend(episode_entries(4))
        await (await w.submit(snapshot(4, log))).wait()
    assert leftovers(root) == []
    assert [i.name for i in list_checkpoints(root)] == ["ep_000003", "ep_000004"]
    _assert_reader_sees(root, 4)


def test_crashes_leave_leftovers_to_clean(crashed: dict[str, Path]) -> None:
    """The crash children did die mid-protocol: temp dirs and trash were really left behind."""
    left = {step: leftovers(root) for step, root in crashed.items()}
    tmp_steps = {s for s, names in left.items() if any(n.startswith(".tmp-ep_") for n in names)}
    trash_steps = {s for s, names in left.items() if any(n.startswith(".trash-") for n in names)}
    assert tmp_steps == {"tmp_created", "memory_written", "files_written", "runtime_written",
                         "tmp_dir_synced"}
    assert trash_steps == {"trash_renamed"}


# -- an I/O error (not a death) right after each step ----------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("step", STEPS)
async def test_error_after_step_is_reported_and_loses_nothing(
    tmp_path: Path, step: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error after any step is counted (failed or retention error) or, for the
    background removal after the last commit, logged at close; no temp dir stays."""
    root = tmp_path / "ckpts"
    storage = FaultStorage(root, step=step, episode=3, action=raise_eio)
    log = MemoryLog()
    async with CheckpointWriter(storage=storage, keep_last=2, on_error="warn") as w:
        for ep in (1, 2, 3):
            log.extend(episode_entries(ep))
            await w.submit(snapshot(ep, log))
        await w.flush()
        stats = w.stats
    if step == "trash_renamed":
        # The checkpoint is durable and latest moved; only deleting ep 1 failed.
        assert (stats.written, stats.failed, stats.retention_errors) == (3, 0, 1)
    elif step == "deleted":
        # ep 1 vanished in the commit; removing its files failed in the background after
        # the last commit, so no commit report is left to carry it: closing logs it.
        assert (stats.written, stats.failed, stats.retention_errors) == (3, 0, 0)
        assert "error while removing the files of a deleted checkpoint" in caplog.text
        assert "the next writer to open the directory removes them" in caplog.text
    else:
        assert (stats.written, stats.failed) == (2, 1)
    assert [n for n in leftovers(root) if n.startswith(".tmp-")] == []
    verify_checkpoint(root / "ep_000002")
    _assert_reader_sees(root, _expected_episode(step))


@pytest.mark.anyio
async def test_background_removal_error_is_reported_by_the_next_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deleted checkpoint's files that could not be removed in the background make the
    next commit's retention error (named), and the next writer removes them."""
    class FailFirstRemoval(LocalStorage):
        failed = False

        def _step(self, name: str) -> None:
            if name == "deleted" and not self.failed:  # ep 1's files, after ep 3
                self.failed = True
                raise_eio(name)

    root = tmp_path / "ckpts"
    storage = FailFirstRemoval(root)
    log = MemoryLog()
    reports = []
    async with CheckpointWriter(storage=storage, keep_last=2, on_error="warn") as w:
        for ep in (1, 2, 3, 4):
            log.extend(episode_entries(ep))
            reports.append(await (await w.submit(snapshot(ep, log))).wait())
        stats = w.stats
    assert stats.retention_errors == 1
    assert reports[3].deleted == ("ep_000002",)
    msg = next(r.getMessage() for r in caplog.records if "retention" in r.getMessage())
    assert "error while removing the files of a deleted checkpoint" in msg
    assert ".trash-ep_000001-" in msg
    assert [i.name for i in list_checkpoints(root)] == ["ep_000003", "ep_000004"]
    async with CheckpointWriter(root, keep_last=2, executor="thread"):
        assert leftovers(root) == []


async def _write_three(storage: LocalStorage) -> None:
    log = MemoryLog()
    async with CheckpointWriter(storage=storage, keep_last=2) as w:
        for ep in (1, 2, 3):
            log.extend(episode_entries(ep))
            await w.submit(snapshot(ep, log))


@pytest.mark.anyio
@pytest.mark.parametrize("step", sorted(set(STEPS) - RETENTION_STEPS))
async def test_error_after_step_raises_writer_failed(tmp_path: Path, step: str) -> None:
    """With on_error="raise", an I/O error after a commit step surfaces as WriterFailedError."""
    storage = FaultStorage(tmp_path / "c", step=step, episode=3, action=raise_eio)
    with pytest.raises(WriterFailedError, match=r"^checkpoint for episode 3 failed: Input/output error while (writing checkpoint|updating the latest pointer in) .*\[errno 5\]"):  # noqa: E501
        await _write_three(storage)
    _assert_reader_sees(tmp_path / "c", _expected_episode(step))


@pytest.mark.anyio
async def test_error_then_retry_same_episode_succeeds(tmp_path: Path) -> None:
    """After an I/O error past the rename, writing the same episode again replaces it cleanly."""
    root = tmp_path / "c"
    storage = FaultStorage(root, step="renamed", episode=3, action=raise_eio)
    log = memory_until(3)
    async with CheckpointWriter(storage=storage, on_error="warn") as w:
        await w.submit(snapshot(2, memory_until(2)))
        await w.submit(snapshot(3, log))
        await w.flush()
        storage.fault_episode = -1
        await (await w.submit(snapshot(3, log))).wait()
    assert leftovers(root) == []
    _assert_reader_sees(root, 3)


# -- the order of the protocol, observed at the system-call level ----------------------


@pytest.mark.anyio
async def test_everything_is_fsynced_before_latest_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files, the temp dir and the parent are fsynced before the rename / pointer they guard."""
    events = record_protocol(monkeypatch)
    root = tmp_path / "c"
    # In this process, so the syscalls can be watched; the writer process runs the same code.
    async with CheckpointWriter(root, executor="thread") as w:
        await (await w.submit(snapshot(1, memory_until(1)))).wait()
    kinds = [(k, Path(v.split(" -> ")[-1]).name if k != "fsync" else v) for k, v in events]
    i_rename = next(i for i, (k, v) in enumerate(kinds) if k == "rename" and v == "ep_000001")
    i_link = next(i for i, (k, v) in enumerate(kinds) if k == "replace" and v == "latest")
    synced_before = {Path(v).name for k, v in kinds[:i_rename] if k == "fsync"}
    tmp_name = Path(events[i_rename][1].split(" -> ")[0]).name
    assert {"memory_1.jsonl", "agent.json", "runtime.json", tmp_name} <= synced_before
    assert ("fsync", str(root)) in kinds[i_rename:i_link]
    assert ("fsync", str(root)) in kinds[i_link:]


# -- the writer process dies under a live run ------------------------------------------


def _lock_owner(root: Path) -> int:
    """The writer process (it holds the directory lock), for a test to SIGKILL as OOM would."""
    # The lock file names the training process (the one a user would stop); the writer
    # process is its child.
    assert int((root / ".lock").read_text().split()[1]) == os.getpid()
    return writer_process_pid()


@pytest.mark.anyio
async def test_writer_process_killed_next_checkpoint_recovers(tmp_path: Path) -> None:
    """A writer process SIGKILLed between checkpoints (as OOM would) is replaced by the
    next checkpoint, which is written; the one after it too."""
    root = tmp_path / "c"
    log = memory_until(1)
    async with CheckpointWriter(root, executor="process", on_error="warn") as w:
        await (await w.submit(snapshot(1, log))).wait()
        await kill_wholly(_lock_owner(root))
        log.extend(episode_entries(2))
        assert (await (await w.submit(snapshot(2, log))).wait()).episode_index == 2
        log.extend(episode_entries(3))
        await (await w.submit(snapshot(3, log))).wait()
    assert leftovers(root) == []
    _assert_reader_sees(root, 3)
    verify_checkpoint(root / "ep_000001")


@pytest.mark.anyio
async def test_writer_process_killed_raise_stops_training(tmp_path: Path) -> None:
    """With on_error="raise", a writer process killed between checkpoints stops nothing:
    no checkpoint was lost, the next one starts a new process."""
    root = tmp_path / "c"
    log = memory_until(1)
    await _kill_writer_then_flush(root, log)
    _assert_reader_sees(root, 2)


async def _kill_writer_then_flush(root: Path, log: MemoryLog) -> None:
    async with CheckpointWriter(root, executor="process") as w:
        await (await w.submit(snapshot(1, log))).wait()
        await kill_wholly(_lock_owner(root))
        log.extend(episode_entries(2))
        await w.submit(snapshot(2, log))
        await w.flush()


# -- leftovers from a deletion that died half-way --------------------------------------


def _half_deleted_trash(root: Path, name: str) -> Path:
    """Rename a checkpoint to trash and remove part of it, as a killed rmtree leaves it."""
    trash = root / f".trash-{name}-0badc0de"
    os.rename(root / name, trash)
    next(trash.glob("memory_*.jsonl")).unlink()  # rmtree got this far, runtime.json stays
    return trash


@pytest.mark.anyio
async def test_half_deleted_trash_is_removed_not_restored(tmp_path: Path) -> None:
    """A .trash-* whose removal was cut short is removed on start, never put back incomplete."""
    root = tmp_path / "c"
    from _fault_util import write_episodes

    await write_episodes(root, range(1, 3), executor="thread")
    _half_deleted_trash(root, "ep_000001")
    async with CheckpointWriter(root, executor="thread"):
        pass
    assert leftovers(root) == []
    _assert_no_incomplete(root)
    assert [i.name for i in list_checkpoints(root)] == ["ep_000002"]


@pytest.mark.anyio
async def test_complete_trash_of_a_recommit_is_restored(tmp_path: Path) -> None:
    """A whole checkpoint moved aside by a re-commit that then died is put back on start."""
    root = tmp_path / "c"
    from _fault_util import write_episodes

    await write_episodes(root, range(1, 3), executor="thread")
    os.rename(root / "ep_000002", root / ".replaced-ep_000002-0badc0de")
    async with CheckpointWriter(root, executor="thread"):
        pass
    assert leftovers(root) == []
    _assert_reader_sees(root, 2)


@pytest.mark.anyio
async def test_whole_trash_of_a_retention_delete_stays_deleted(tmp_path: Path) -> None:
    """A checkpoint retention had renamed to trash is not resurrected by the next start."""
    root = tmp_path / "c"
    from _fault_util import write_episodes

    await write_episodes(root, range(1, 3), executor="thread")
    os.rename(root / "ep_000001", root / ".trash-ep_000001-0badc0de")
    async with CheckpointWriter(root, executor="thread"):
        pass
    assert leftovers(root) == []
    assert [i.name for i in list_checkpoints(root)] == ["ep_000002"]


@pytest.mark.parametrize("step", ["renamed", "parent_synced"])
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_a_writer_opening_after_a_kill_moves_a_lagging_latest_on(
    tmp_path: Path, step: str, executor: str
) -> None:
    """Killed after ep 3 was renamed into place, before latest moved: ep 3 is whole and
    durable, latest still names ep 2. The next writer's open moves latest to ep 3 (before
    any commit), so a resume that loads the directory then continues from ep 3, and the
    run's next checkpoint, ep 4, does not collide with it."""
    import subprocess

    root = tmp_path / "ckpts"
    p = subprocess.run([PY, str(HERE), "crash", str(root), step, "exit"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == CRASH_EXIT, p.stderr
    assert load_checkpoint(root).runtime.episode_index == 2
    assert verify_checkpoint(root / "ep_000003").episode_index == 3

    async def main() -> None:
        async with CheckpointWriter(root, keep_last=2, executor=executor) as w:
            loaded = load_checkpoint(root)
            assert loaded.runtime.episode_index == 3
            log = loaded.memory
            log.extend(episode_entries(4))
            await (await w.submit(snapshot(4, log))).wait()

    anyio.run(main)
    assert load_checkpoint(root).runtime.episode_index == 4
    assert os.readlink(root / "latest") == "ep_000004"
    _assert_no_incomplete(root)


def test_latest_moved_back_by_a_recommit_is_left_alone(tmp_path: Path) -> None:
    """A higher episode committed *before* the one latest names is another history
    (replace=True going back): opening a writer does not move latest to it."""
    root = tmp_path / "ckpts"

    async def main() -> None:
        log = MemoryLog()
        async with CheckpointWriter(root) as w:
            for ep in (1, 2, 3):
                log.extend(episode_entries(ep))
                await (await w.submit(snapshot(ep, log))).wait()
            back = memory_until(1)
            await (await w.submit(snapshot(1, back), replace=True)).wait()
        async with CheckpointWriter(root):
            pass

    anyio.run(main)
    assert load_checkpoint(root).runtime.episode_index == 1


@pytest.mark.parametrize("planted", ["outside", "dangling"])
def test_a_writer_opening_points_an_unusable_latest_at_a_checkpoint(
    tmp_path: Path, planted: str
) -> None:
    """latest replaced by a symlink that leads outside (planted) or to nothing (its
    checkpoint removed by hand): readers refuse it, saying how to get past it, and read
    nothing through it; the next writer's open points it at what latest.json names
    (found by a new-user trial: the README's resume then failed on the same error)."""
    from ckptwriter import UnsafePathError

    root = tmp_path / "ckpts"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "runtime.json").write_text("{}")

    async def write(episodes: tuple[int, ...]) -> None:
        log = MemoryLog()
        async with CheckpointWriter(root) as w:
            for ep in episodes:
                log.extend(episode_entries(ep))
                await (await w.submit(snapshot(ep, log))).wait()

    anyio.run(write, (1, 2))
    os.unlink(root / "latest")
    os.symlink(outside if planted == "outside" else "ep_000009", root / "latest")
    if planted == "outside":
        with pytest.raises(UnsafePathError, match=r"Nothing was read through it\. Load a "
                           r"checkpoint by its name .* or remove latest: a writer opening"):
            load_checkpoint(root)

    async def reopen() -> None:
        async with CheckpointWriter(root):
            pass

    anyio.run(reopen)
    assert os.readlink(root / "latest") == "ep_000002"
    assert load_checkpoint(root).runtime.episode_index == 2
    assert sorted(p.name for p in outside.iterdir()) == ["runtime.json"]
