"""The ``best`` pointer: the best ``val_score`` by the writer's mode, moved like ``latest``.

Crash tests kill a real process (``os._exit``, no cleanup) right after each step of the
pointer protocol (``LocalStorage.BEST_STEPS``). This module is also their child program
(``python test_best_pointer.py crashes <base> <case>...``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from _fault_util import CRASH_EXIT, leftovers, memory_until, snapshot
from _s3_util import s3_endpoint  # noqa: F401 -- the fixture make_backend asks for
from ckptwriter import (
    CheckpointError,
    CheckpointNotFoundError,
    SyncCheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.retention import CheckpointRecord
from ckptwriter.storage import LocalStorage

HERE = Path(__file__).resolve()
PY = sys.executable


def _best(root: Path) -> tuple[str | None, str | None]:
    """(what the best symlink names, what best.json names); None where absent."""
    link = os.readlink(root / "best") if os.path.lexists(root / "best") else None
    doc = root / "best.json"
    return link, json.loads(doc.read_text())["checkpoint"] if doc.exists() else None


def _write(root: Path, scores: list[float | None], *, first: int = 1,
           executor: str = "thread", **kw: object) -> list[CheckpointRecord | None]:
    """Commit one checkpoint per score (episodes first, first+1...); best after each."""
    seen: list[CheckpointRecord | None] = []
    with SyncCheckpointWriter(root, executor=executor, **kw) as w:  # type: ignore[arg-type]
        for ep, score in enumerate(scores, start=first):
            w.submit(snapshot(ep, memory_until(ep), val_score=score)).wait()
            seen.append(w.best)
    return seen


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_best_moves_only_when_beaten_ties_to_the_newer(tmp_path: Path, executor: str) -> None:
    """max: best moves to a higher score, and to an equal one (newer); never to unscored."""
    root = tmp_path / "c"
    seen = _write(root, [0.5, 0.9, 0.1, None, 0.9, 0.3], executor=executor)
    assert [r.name if r else None for r in seen] == [
        "ep_000001", "ep_000002", "ep_000002", "ep_000002", "ep_000005", "ep_000005"]
    assert _best(root) == ("ep_000005", "ep_000005")
    rt = json.loads((root / "ep_000005" / "runtime.json").read_text())
    assert json.loads((root / "best.json").read_text()) == {
        "checkpoint": "ep_000005", "episode_index": 5, "val_score": 0.9,
        "timestamp": rt["timestamp"],
    }


def test_mode_min_follows_the_lowest_score(tmp_path: Path) -> None:
    """mode="min": the lowest val_score is best (a loss)."""
    root = tmp_path / "c"
    seen = _write(root, [0.5, 0.9, 0.1, 0.2], mode="min")
    assert [r.name if r else None for r in seen] == [
        "ep_000001", "ep_000001", "ep_000003", "ep_000003"]
    assert _best(root) == ("ep_000003", "ep_000003")


def test_no_score_no_best_pointer(tmp_path: Path) -> None:
    """Without any val_score there is no best, best.json or CheckpointWriter.best."""
    root = tmp_path / "c"
    assert _write(root, [None, None]) == [None, None]
    assert _best(root) == (None, None)
    with pytest.raises(CheckpointNotFoundError, match=(
        rf"^Checkpoint not found: {root}/best\nNo best in {root} \(best is missing\): the "
        r"writer keeps one only once a checkpoint has a val_score; load latest or a "
        r"checkpoint by name instead\.\n"
    )):
        load_checkpoint(root / "best")


def test_retention_never_deletes_the_best(tmp_path: Path) -> None:
    """last_n keeps the best however old; it goes only once beaten, in the same pass."""
    root = tmp_path / "c"
    _write(root, [0.9, 0.1, None, 0.2], keep_last=1)
    assert [i.name for i in list_checkpoints(root)] == ["ep_000001", "ep_000004"]
    _write(root, [0.95], first=5, keep_last=1)
    assert [i.name for i in list_checkpoints(root)] == ["ep_000005"]
    assert _best(root) == ("ep_000005", "ep_000005")


@pytest.mark.parametrize(("again", "expected"), [
    pytest.param(0.1, ("ep_000001", "ep_000001"), id="lower-score-moves-best"),
    pytest.param(0.99, ("ep_000002", "ep_000002"), id="higher-score-rewrites-best-json"),
    pytest.param(None, ("ep_000001", "ep_000001"), id="unscored-moves-best"),
])
def test_recommitting_the_best_keeps_the_pointer_consistent(
    tmp_path: Path, again: float | None, expected: tuple[str, str]
) -> None:
    """The best re-committed with another score: best is ranked again, best.json rewritten."""
    root = tmp_path / "c"
    _write(root, [0.5, 0.9])
    with SyncCheckpointWriter(root, executor="thread") as w:
        w.submit(snapshot(2, memory_until(2), val_score=again), replace=True).wait()
        assert w.best is not None
        assert w.best.name == expected[0]
    assert _best(root) == expected
    doc = json.loads((root / "best.json").read_text())
    rt = json.loads((root / expected[0] / "runtime.json").read_text())
    assert (doc["val_score"], doc["timestamp"]) == (rt["val_score"], rt["timestamp"])


def test_the_only_scored_checkpoint_recommitted_unscored_removes_best(tmp_path: Path) -> None:
    """No scored checkpoint left: best and best.json go."""
    root = tmp_path / "c"
    _write(root, [0.5, None])
    with SyncCheckpointWriter(root, executor="thread") as w:
        w.submit(snapshot(1, memory_until(1)), replace=True).wait()
        assert w.best is None
    assert _best(root) == (None, None)
    assert leftovers(root) == []


@pytest.mark.parametrize("damage", ["stale", "missing-json", "dangling", "other-mode"])
def test_open_puts_a_wrong_best_right(tmp_path: Path, damage: str) -> None:
    """A best that disagrees with the checkpoints at open is fixed before any commit."""
    root = tmp_path / "c"
    _write(root, [0.5, 0.9, 0.1])
    mode = "max"
    if damage == "stale":  # as a crash between latest and best leaves it
        (root / "best").unlink()
        os.symlink("ep_000001", root / "best")
    elif damage == "missing-json":
        (root / "best.json").unlink()
    elif damage == "dangling":
        (root / "best").unlink()
        os.symlink("ep_000042", root / "best")
        (root / "best.json").write_text('{"checkpoint": "ep_000042", "episode_index": 42}')
    else:
        mode = "min"
    with SyncCheckpointWriter(root, executor="thread", mode=mode):
        pass
    want = "ep_000003" if mode == "min" else "ep_000002"
    assert _best(root) == (want, want)
    assert load_checkpoint(root / "best").runtime.episode_index == int(want[3:])


def test_load_checkpoint_follows_best_and_best_json(tmp_path: Path) -> None:
    """load_checkpoint(<dir>/best) and (<dir>/best.json) give the best checkpoint."""
    root = tmp_path / "c"
    _write(root, [0.5, 0.9, 0.1])
    for name in ("best", "best.json"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = load_checkpoint(root / name)
        assert loaded.runtime.episode_index == 2
        assert loaded.memory.to_jsonl() == memory_until(2).to_jsonl()


def test_best_json_on_object_storage(tmp_path: Path) -> None:
    """memory://: best.json alone (no symlink) is kept and read back by load_checkpoint."""
    import fsspec

    url = f"memory://ckptwriter-best-{os.getpid()}/c"
    fs = fsspec.filesystem("memory")
    try:
        with SyncCheckpointWriter(url, keep_last=1) as w:
            for ep, score in [(1, 0.9), (2, 0.1), (3, None)]:
                w.submit(snapshot(ep, memory_until(ep), val_score=score)).wait()
        root = url.removeprefix("memory://")
        assert json.loads(fs.cat_file(f"/{root}/best.json"))["checkpoint"] == "ep_000001"
        assert [i.name for i in list_checkpoints(url)] == ["ep_000001", "ep_000003"]
        assert load_checkpoint(f"{url}/best").runtime.episode_index == 1
        with SyncCheckpointWriter(url, executor="thread") as w:
            w.submit(snapshot(1, memory_until(1)), replace=True).wait()  # same bytes, no score
        assert not fs.exists(f"/{root}/best.json")
    finally:
        fs.rm(f"/ckptwriter-best-{os.getpid()}", recursive=True)


# -- object storage: best.json moved by one conditional PUT, a kill on either side -----

_S3_CHILD = """
import os, sys
from ckptwriter import SyncCheckpointWriter
from ckptwriter.storage.remote import RemoteStorage
sys.path.insert(0, sys.argv[3])
from _fault_util import memory_until, snapshot

url, step = sys.argv[1], sys.argv[2]

class DiesAtStep(RemoteStorage):
    def _step(self, name):
        if name == step:
            os._exit(3)

with SyncCheckpointWriter(storage=DiesAtStep(url), keep_last=1) as w:
    w.submit(snapshot(2, memory_until(2), val_score=0.9)).wait()
"""


@pytest.mark.s3
@pytest.mark.parametrize("step", ["latest_written", "best_written"])
def test_s3_killed_around_the_best_json_put_names_a_whole_checkpoint(
    request: pytest.FixtureRequest, tmp_path: Path, step: str
) -> None:
    """S3 (moto): killed before or after best.json moves, it names a whole checkpoint."""
    from _s3_util import make_backend

    s3 = make_backend("s3", tmp_path, request)
    with SyncCheckpointWriter(s3.url, keep_last=1, executor="thread") as w:
        w.submit(snapshot(1, memory_until(1), val_score=0.5)).wait()
    child = subprocess.run([PY, "-c", _S3_CHILD, s3.url, step, str(HERE.parent)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 3, child.stderr
    named = json.loads(s3.read_raw("best.json"))["checkpoint"]
    assert named == ("ep_000001" if step == "latest_written" else "ep_000002")
    verify_checkpoint(f"{s3.url}/{named}")
    assert load_checkpoint(f"{s3.url}/best").runtime.episode_index == int(named[3:])
    s3.fs.rm(f"{s3.root}/.lock")  # the dead writer's, as its message says to do
    with SyncCheckpointWriter(s3.url, executor="thread"):
        pass  # the next open puts best.json right
    assert json.loads(s3.read_raw("best.json"))["checkpoint"] == "ep_000002"


# -- an I/O error while best moves: the commit stands, retention spares both names ----


class _FailOnce(LocalStorage):
    """Fails (EIO) right after one step, once."""

    def __init__(self, root: Path, step: str) -> None:
        super().__init__(root)
        self.fail_at: str | None = step

    def _step(self, name: str) -> None:
        if name == self.fail_at:
            self.fail_at = None
            raise OSError(errno.EIO, "injected I/O error")


@pytest.mark.parametrize("step", ["best_link_replaced", "best_json_replaced"])
def test_io_error_moving_best_keeps_the_commit_and_both_names(
    tmp_path: Path, step: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint is durable and latest moved; what best may name is not deleted."""
    root = tmp_path / "c"
    _write(root, [0.5], keep_last=1)
    with SyncCheckpointWriter(storage=_FailOnce(root, step), keep_last=1) as w:
        with caplog.at_level(logging.WARNING, "ckptwriter"):
            w.submit(snapshot(2, memory_until(2), val_score=0.9)).wait()
        assert "ep_000002 is committed, but best could not be moved to ep_000002 (it still " \
               "names ep_000001; the next checkpoint tries again)" in caplog.text
        assert os.readlink(root / "latest") == "ep_000002"
        for name in filter(None, _best(root)):
            verify_checkpoint(root / name)
        assert {"ep_000001", "ep_000002"} <= {i.name for i in list_checkpoints(root)}
        w.submit(snapshot(3, memory_until(3), val_score=0.1)).wait()
    assert _best(root) == ("ep_000002", "ep_000002")
    assert [i.name for i in list_checkpoints(root)] == ["ep_000002", "ep_000003"]
    assert leftovers(root) == []


def test_a_commit_whose_latest_move_failed_is_still_ranked(tmp_path: Path) -> None:
    """ep 2 is on disk but latest failed to move: the next commit still ranks it for best."""
    root = tmp_path / "c"
    _write(root, [0.5])
    with SyncCheckpointWriter(storage=_FailOnce(root, "latest_link_replaced"),
                              on_error="warn") as w:
        with pytest.raises(CheckpointError):
            w.submit(snapshot(2, memory_until(2), val_score=0.9)).wait()
        w.submit(snapshot(3, memory_until(3), val_score=0.1)).wait()
    assert _best(root) == ("ep_000002", "ep_000002")
    verify_checkpoint(root / "ep_000002")


# -- a process death right after each step of the pointer protocol ---------------------

# (scenario, step): "move" commits a better ep 2 over best ep 1 (keep_last=1, so ep 1 is
# deleted once best has left it); "remove" re-commits the only scored ep 1 unscored.
MOVE_STEPS = ["pointer_synced", "best_link_replaced", "best_json_replaced", "best_synced"]
REMOVE_STEPS = ["best_json_removed", "best_link_removed", "best_synced"]
CASES = [f"move:{s}" for s in MOVE_STEPS] + [f"remove:{s}" for s in REMOVE_STEPS]


class _DieAt(LocalStorage):
    def __init__(self, root: str, step: str) -> None:
        super().__init__(root)
        self.die_at = step

    def _step(self, name: str) -> None:
        if name == self.die_at:
            os._exit(CRASH_EXIT)


def _one_crash(root: str, scenario: str, step: str) -> None:
    if scenario == "move":
        _write(Path(root), [0.5], keep_last=1)
        with SyncCheckpointWriter(storage=_DieAt(root, step), keep_last=1) as w:
            w.submit(snapshot(2, memory_until(2), val_score=0.9)).wait()
    else:
        _write(Path(root), [0.5, None])
        with SyncCheckpointWriter(storage=_DieAt(root, step)) as w:
            w.submit(snapshot(1, memory_until(1)), replace=True).wait()


def _child_crashes(base: str, *cases: str) -> None:
    """Fork one child per case (imports paid once); print each exit status."""
    pids = {}
    for case in cases:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                _one_crash(f"{base}/{case.replace(':', '-')}", *case.split(":"))
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
def crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case's directory, its writer killed right after the step it names."""
    base = tmp_path_factory.mktemp("best-crash")
    res = subprocess.run([PY, str(HERE), "crashes", str(base), *CASES],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == dict.fromkeys(CASES, CRASH_EXIT), res.stderr
    return {c: base / c.replace(":", "-") for c in CASES}


def _expected_best(case: str) -> tuple[str | None, str | None]:
    scenario, step = case.split(":")
    if scenario == "remove":
        return {"best_json_removed": ("ep_000001", None)}.get(step, (None, None))
    link = "ep_000001" if step == "pointer_synced" else "ep_000002"
    return link, "ep_000001" if step in ("pointer_synced", "best_link_replaced") else link


@pytest.mark.parametrize("case", CASES)
def test_killed_after_a_best_step_best_names_a_whole_checkpoint(
    crashes: dict[str, Path], case: str
) -> None:
    """After the kill: best and best.json name whole checkpoints (or are gone); latest loads."""
    root = crashes[case]
    assert _best(root) == _expected_best(case)
    for name in filter(None, _best(root)):
        verify_checkpoint(root / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # latest must be usable as it is
        latest = load_checkpoint(root / "latest").runtime
        if any(_best(root)):
            load_checkpoint(root / "best")
    assert latest.episode_index == (2 if case.startswith("move") else 1)


@pytest.mark.parametrize("case", CASES)
def test_killed_after_a_best_step_next_open_puts_best_right(
    crashes: dict[str, Path], case: str
) -> None:
    """The next writer's open leaves best exactly on the best checkpoint, no leftovers."""
    root = crashes[case]
    with SyncCheckpointWriter(root, executor="thread"):
        pass
    want = "ep_000002" if case.startswith("move") else None
    assert _best(root) == (want, want)
    assert leftovers(root) == []


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"crashes": _child_crashes}[cmd](*rest)
