"""Readers of a live run besides ``load_checkpoint``: ``verify_checkpoint`` (of ``latest``,
``best``, a named checkpoint), ``list_checkpoints``, ``ckptwriter verify`` and ``ls``,
while a writer process retires, re-commits (``replace=True``) and moves the pointers; and
``latest``/``best`` (and their JSON twins) verified by the pointer rules on every backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _s3_util import Backend, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import (
    CheckpointNotFoundError,
    MemoryLog,
    SyncCheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.cli import main as cli
from conftest import add_episode, snapshot

WRITER = Path(__file__).resolve().with_name("_live_writer.py")
LIVE_BACKENDS = [
    pytest.param("local", id="local"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]


@pytest.fixture
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A writer process committing into a fresh location (param: backend), until the
    test ends; the location once its first checkpoint, ``latest`` and ``best`` exist."""
    backend = make_backend(request.param, tmp_path, request)
    # A cap, not a clock: the readers end the run by closing its stdin long before.
    proc = subprocess.Popen([sys.executable, str(WRITER), backend.url, "100000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        yield backend
    finally:
        proc.stdin.close()
        out = proc.stdout.read()  # until it exits (pytest-timeout guards a hang)
        proc.stdout.close()
        proc.wait()
    assert proc.returncode == 0
    assert json.loads(out)["commits"] > 1


def _episodes_while(backend: Backend, reads: int, read: Callable[[], int | None]
                    ) -> tuple[list[str], set[int]]:
    """Run ``read`` ``reads`` times, and on (up to 50 times as many) until it has seen two
    episodes: a busy machine may starve the writer; every exception or warning, and the
    episodes seen."""
    failures: list[str] = []
    seen: set[int] = set()
    for i in range(reads * 50):
        if i >= reads and len(seen) >= 2:
            break
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ep = read()
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                ep = None
        failures += [f"{w.category.__name__}: {w.message}" for w in caught]
        if ep is not None:
            seen.add(ep)
    return failures, seen


def _named_by_latest(backend: Backend) -> str:
    return str(json.loads(backend.read_raw("latest.json"))["checkpoint"])


def _verify_named(backend: Backend) -> int | None:
    try:
        return verify_checkpoint(f"{backend.url}/{_named_by_latest(backend)}").episode_index
    except CheckpointNotFoundError:
        return None  # named explicitly, then retired: a fair answer for a name


def _listed(backend: Backend) -> int:
    infos = list_checkpoints(backend.url)
    assert [i.problem for i in infos if not i.complete] == []
    return infos[-1].episode_index


# Reads per case: bounded by work, enough that the writer commits many times meanwhile.
_READS = {"local": 300, "s3": 40}


@pytest.mark.parametrize("live", LIVE_BACKENDS, indirect=True)
@pytest.mark.parametrize("target", [
    pytest.param("latest", id="latest"),
    pytest.param("latest.json", id="latest-json"),
    pytest.param("best", id="best"),
    pytest.param("named", id="named"),
    pytest.param("list", id="list_checkpoints"),
])
def test_verify_and_list_never_fail_on_a_live_run(live: Backend, target: str) -> None:
    """verify_checkpoint of latest, best or a named checkpoint, and list_checkpoints, while
    a writer retires, re-commits and moves the pointers: no error, no warning, no
    INCOMPLETE (found: sha256 mismatches, missing files, "size ... (truncated?)")."""
    read: Callable[[], int | None] = {
        "named": lambda: _verify_named(live),
        "list": lambda: _listed(live),
    }.get(target, lambda: verify_checkpoint(f"{live.url}/{target}").episode_index)
    failures, seen = _episodes_while(live, _READS[live.kind], read)
    assert failures == []
    assert len(seen) >= 2  # the reads did overlap the writer's commits


@pytest.mark.parametrize("live", LIVE_BACKENDS, indirect=True)
def test_cli_verify_and_ls_pass_on_a_live_run(
    live: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ckptwriter verify DIR` exits 0 on a healthy live run (a checkpoint retired while it
    runs is RETIRED, latest is judged against a listing it agrees with) and `ls` shows
    no INCOMPLETE (found: "BROKEN latest: points at ep_N, which does not exist", "error:
    Checkpoint not found", BROKEN sha256 mismatch)."""
    runs = {"local": 40, "s3": 6}[live.kind]
    episodes: set[str] = set()
    # At least `runs` rounds, more (bounded) until the writer is seen to move on.
    for i in range(runs * 20):
        if i >= runs and len(episodes) > 2:
            break
        assert cli(["verify", live.url]) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "BROKEN" not in out, out
        assert "WARN" not in out, out
        episodes.update(line.split()[1] for line in out.splitlines() if line.startswith("OK"))
        assert cli(["ls", live.url]) == 0
        out = capsys.readouterr().out
        assert "INCOMPLETE" not in out, out
    assert len(episodes) > 2  # the writer moved on while verify ran


def _two_scored(root: str) -> None:
    memory = MemoryLog()
    with SyncCheckpointWriter(root, fsync=False, executor="thread") as w:
        for ep, score in ((1, 0.9), (2, 0.1)):
            add_episode(memory, ep)
            w.submit(snapshot(memory, ep, val_score=score)).wait()


@pytest.mark.parametrize("kind", LIVE_BACKENDS)
@pytest.mark.parametrize(("pointer", "episode"), [
    pytest.param("latest", 2, id="latest"),
    pytest.param("latest.json", 2, id="latest-json"),
    pytest.param("best", 1, id="best"),
    pytest.param("best.json", 1, id="best-json"),
])
def test_pointers_are_verified_by_the_pointer_rules_on_every_backend(
    kind: str, pointer: str, episode: int, tmp_path: Path, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """verify_checkpoint and `ckptwriter verify` of latest, latest.json, best, best.json
    check the one checkpoint the pointer names (found: always CheckpointNotFoundError on
    S3, where there is no symlink, and for latest.json on both backends)."""
    root = make_backend(kind, tmp_path, request).url
    _two_scored(root)
    assert verify_checkpoint(f"{root}/{pointer}").episode_index == episode
    capsys.readouterr()
    assert cli(["verify", f"{root}/{pointer}"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"OK      {root}/{pointer} (2 files, episode {episode})", "1/1 checkpoints OK"]


def test_cli_verify_reports_a_listed_non_directory_as_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ep_* that is a file is BROKEN, not retired (it is still there) and not an abort."""
    root = tmp_path / "ck"
    _two_scored(str(root))
    (root / "ep_000009").write_bytes(b"")
    assert cli(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN  {root / 'ep_000009'}: not a directory\n" in out
    assert out.endswith("2/3 checkpoints OK, 1 problem(s)\n")


def test_a_listing_lapped_by_retention_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every checkpoint a listing named is retired while it is read, and a newer one
    committed (a slow reader, a writer retiring one per commit): list_checkpoints lists
    again instead of answering that there are none (found by the suite on a busy
    machine: an empty list)."""
    from ckptwriter.storage.local_store import LocalStore

    root, elsewhere = tmp_path / "c", tmp_path / "elsewhere"
    memory = MemoryLog()
    with SyncCheckpointWriter(root, fsync=False, executor="thread") as w:
        for ep in (1, 2):
            add_episode(memory, ep)
            w.submit(snapshot(memory, ep)).wait()
    with SyncCheckpointWriter(elsewhere, fsync=False, executor="thread") as w:
        add_episode(memory, 3)
        w.submit(snapshot(memory, 3)).wait()
    sizes = LocalStore.sizes
    lapped: list[bool] = []

    def lapping(self: LocalStore, path: str) -> dict[str, int]:
        if not lapped:  # between this listing's names and its sizes: two commits go by
            lapped.append(True)
            for name in ("ep_000001", "ep_000002"):
                (root / name).rename(tmp_path / f"retired-{name}")
            (elsewhere / "ep_000003").rename(root / "ep_000003")
        return sizes(self, path)

    monkeypatch.setattr(LocalStore, "sizes", lapping)
    assert [(i.name, i.complete) for i in list_checkpoints(root)] == [("ep_000003", True)]
    assert lapped == [True]


@pytest.mark.parametrize("kind", LIVE_BACKENDS)
def test_verify_checkpoint_of_a_checkpoints_directory_verifies_its_latest(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """A checkpoints directory means its latest, as for load_checkpoint (it said
    "runtime.json: missing" of a healthy directory)."""
    root = make_backend(kind, tmp_path, request).url
    _two_scored(root)
    assert verify_checkpoint(root).episode_index == 2
    assert load_checkpoint(root).runtime.episode_index == 2


def test_verify_checkpoint_reads_run_directories_as_load_checkpoint_does(
    tmp_path: Path,
) -> None:
    """A run directory and outputs/<run_name> name their latest (never a fallback); an
    empty directory is not found, not a broken checkpoint."""
    run = tmp_path / "outputs" / "myrun" / "20260101_000000"
    _two_scored(str(run / "checkpoints"))
    (run / "config.yaml").write_text("runtime: {}\n")
    for where in (run, run.parent):
        assert verify_checkpoint(where).episode_index == 2
        assert load_checkpoint(where).runtime.episode_index == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError):
        verify_checkpoint(tmp_path / "empty")
