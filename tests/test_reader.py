"""The one reader (ckptwriter.reader): every form of path resume_from accepts, the same
run ordering and retry rule on every backend, each file read once, live runs."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from _live_reader import LiveReader, Tally
from _s3_util import BACKENDS, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
    CheckpointWriter,
    MemoryLog,
    MemoryTypeMismatchError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.reader import is_whole, scan
from ckptwriter.storage.local import LocalStore
from ckptwriter.storage.location import open_store
from ckptwriter.storage.objects import ObjectStore
from conftest import add_episode, snapshot


def _write(root: Path, episodes: list[int], keep_last: int | None = None) -> MemoryLog:
    mem = MemoryLog()

    async def go() -> None:
        async with CheckpointWriter(root, keep_last=keep_last, fsync=False) as w:
            for ep in episodes:
                add_episode(mem, ep)
                await w.submit(snapshot(mem, ep, val_score=ep / 1000))

    anyio.run(go)
    return mem


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """outputs/my_run/20240115_103045 with checkpoints 100, 200, 300."""
    run = tmp_path / "outputs" / "my_run" / "20240115_103045"
    _write(run / "checkpoints", [100, 200, 300])
    return run


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("checkpoints/latest", id="latest-symlink"),
        pytest.param("checkpoints/latest.json", id="latest-json"),
        pytest.param("checkpoints", id="checkpoints-dir"),
        pytest.param(".", id="run-dir"),
        pytest.param("..", id="run-name-dir"),
    ],
)
def test_latest_forms_resolve_to_newest(run_dir: Path, rel: str) -> None:
    """latest, latest.json, checkpoints/, the run dir and outputs/<run_name> all mean latest."""
    assert resolve_checkpoint(run_dir / rel).name == "ep_000300"


def test_specific_checkpoint_resolves_to_itself(run_dir: Path) -> None:
    """A checkpoint directory resolves to itself."""
    assert resolve_checkpoint(run_dir / "checkpoints" / "ep_000200").name == "ep_000200"


def test_round_trip_restores_memory_byte_identically(tmp_path: Path) -> None:
    """load_checkpoint returns the manifests and the memory exactly as written."""
    mem = _write(tmp_path, [1, 2, 3])
    loaded = load_checkpoint(tmp_path / "latest")
    assert loaded.memory.to_jsonl() == mem.to_jsonl()
    assert loaded.runtime.episode_index == 3
    assert loaded.agent.agent_type == "HistoryAgent"
    assert loaded.agent.memory_type == "history"


def test_missing_path_lists_nearby_checkpoints(run_dir: Path) -> None:
    """The guide's "Checkpoint not found" names the path and what exists nearby."""
    wrong = run_dir / "checkpoints" / "ep_000500"
    with pytest.raises(CheckpointNotFoundError, match=r"^Checkpoint not found: .*ep_000500\n") as e:
        resolve_checkpoint(wrong)
    assert any(p.endswith("ep_000300") for p in e.value.nearby)
    assert "ep_000100" in str(e.value)


def test_broken_named_checkpoint_names_the_file(run_dir: Path) -> None:
    """resume_from at a damaged checkpoint says which file is broken."""
    ck = run_dir / "checkpoints" / "ep_000200"
    data = bytearray((ck / "memory_200.jsonl").read_bytes())
    data[5] ^= 0x01
    (ck / "memory_200.jsonl").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"memory_200\.jsonl: sha256 does not match"):
        load_checkpoint(ck)


def test_broken_latest_falls_back_with_warning(run_dir: Path) -> None:
    """When latest names a broken checkpoint, the newest valid one is used, with a warning."""
    (run_dir / "checkpoints" / "ep_000300" / "memory_300.jsonl").write_bytes(b"")
    with pytest.warns(CheckpointFallbackWarning, match=r"ep_000300, which is broken"):
        assert resolve_checkpoint(run_dir / "checkpoints" / "latest").name == "ep_000200"


def test_missing_latest_falls_back_with_warning(run_dir: Path) -> None:
    """With latest and latest.json gone, the newest complete checkpoint is used."""
    os.unlink(run_dir / "checkpoints" / "latest")
    os.unlink(run_dir / "checkpoints" / "latest.json")
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest is missing"):
        assert resolve_checkpoint(run_dir / "checkpoints").name == "ep_000300"


def test_memory_type_mismatch_names_both(run_dir: Path) -> None:
    """Resuming with another memory type is refused, naming both types."""
    with pytest.raises(MemoryTypeMismatchError, match=r"holds memory_type 'history' but the agent "
                                                      r"uses memory_type 'vector'"):
        load_checkpoint(run_dir / "checkpoints" / "latest", expected_memory_type="vector")


def test_missing_memory_file_says_memory_not_restored(run_dir: Path) -> None:
    """A missing memory snapshot is named."""
    os.unlink(run_dir / "checkpoints" / "ep_000100" / "memory_100.jsonl")
    with pytest.raises(CheckpointCorruptError, match=r"memory_100\.jsonl: missing"):
        verify_checkpoint(run_dir / "checkpoints" / "ep_000100")


def test_list_checkpoints_marks_incomplete(run_dir: Path) -> None:
    """list_checkpoints reports complete and incomplete directories, oldest first."""
    shutil.copytree(run_dir / "checkpoints" / "ep_000300", run_dir / "checkpoints" / "ep_000400")
    os.unlink(run_dir / "checkpoints" / "ep_000400" / "runtime.json")
    infos = list_checkpoints(run_dir / "checkpoints")
    assert [(i.name, i.complete) for i in infos] == [
        ("ep_000100", True), ("ep_000200", True), ("ep_000300", True), ("ep_000400", False)]
    assert infos[3].problem == "runtime.json: missing"
    assert infos[0].runtime is not None
    assert infos[0].runtime.val_score == 0.1


def test_episode_index_must_match_the_directory(run_dir: Path) -> None:
    """An edited episode_index cannot silently restart training from the wrong episode."""
    rt = run_dir / "checkpoints" / "ep_000200" / "runtime.json"
    rt.write_text(rt.read_text().replace('"episode_index": 200', '"episode_index": 0'))
    with pytest.raises(CheckpointCorruptError,
                       match=r"runtime\.json: episode_index is 0 but the directory is ep_000200"):
        verify_checkpoint(rt.parent)


def test_file_inside_a_checkpoint_names_its_directory(run_dir: Path) -> None:
    """resume_from pointing at a file of a checkpoint says to pass the directory."""
    f = run_dir / "checkpoints" / "ep_000200" / "runtime.json"
    with pytest.raises(CheckpointNotFoundError,
                       match=r"file inside checkpoint ep_000200: pass the checkpoint directory"):
        resolve_checkpoint(f)


def test_nearby_looks_beside_an_empty_run(run_dir: Path) -> None:
    """A run directory without checkpoints points at its siblings' checkpoints."""
    empty = run_dir.parent / "20240116_000000"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError) as e:
        resolve_checkpoint(empty)
    assert any(p.endswith("ep_000300") for p in e.value.nearby)


# -- one run ordering on every backend -------------------------------------------------


async def _write_to(url: str, episodes: list[int]) -> None:
    memory = MemoryLog()
    async with CheckpointWriter(url) as w:
        for ep in episodes:
            add_episode(memory, ep)
            await (await w.submit(snapshot(memory, ep))).wait()


@pytest.fixture(params=BACKENDS)
def base_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty location on local disk, memory:// and S3 (moto), as a string."""
    backend = make_backend(str(request.param), tmp_path, request)
    return backend.url.rsplit("/", 1)[0]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_newest_run_is_chosen_in_natural_order_on_every_backend(base_url: str) -> None:
    """outputs/<run_name> with runs _2 and _10: every backend resumes from _10, the newer."""
    runs = f"{base_url}/outputs/my_run"
    # The older run has the higher episode: only the run order can make _10 win.
    await _write_to(f"{runs}/20240101_000000_2/checkpoints", [5])
    await _write_to(f"{runs}/20240101_000000_10/checkpoints", [3])
    assert sorted(["20240101_000000_2", "20240101_000000_10"])[-1].endswith("_2")
    resolved = resolve_checkpoint(runs)
    assert str(resolved) == f"{runs}/20240101_000000_10/checkpoints/ep_000003"
    assert load_checkpoint(runs).runtime.episode_index == 3


# -- each file read once ---------------------------------------------------------------

_OPENED: list[str] = []
_WATCH: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Every open() and os.open() raises "open" before the file is opened (directories
    # too: a listing opens its directory, which is not a read of a file).
    if event == "open" and _WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_WATCH[0] + os.sep) and not os.path.isdir(path):
            _OPENED.append(path)


sys.addaudithook(_audit)


class Reads:
    """Every read of a file (an open, on disk) or an object (a fetch), by path or URL."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.remote: Counter[str] = Counter()
        for name in ("cat", "cat_many", "read_chunks", "read_tagged"):
            self._count(monkeypatch, name)
        # The "open" audit event carries no dir_fd: opens relative to a directory
        # descriptor (how a checkpoint's files are read) are counted here, by full path.
        real_open = os.open

        def open_at(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
                    ) -> int:
            if dir_fd is not None and _WATCH:
                full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fsdecode(path))
                if full.startswith(_WATCH[0] + os.sep) and not os.path.isdir(full):
                    _OPENED.append(full)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", open_at)

    def _count(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        original = getattr(ObjectStore, name)

        def counted(store: ObjectStore, arg: Any, *args: Any, **kw: Any) -> Any:
            for path in [arg] if isinstance(arg, str) else arg:
                self.remote[store.url(path)] += 1
            return original(store, arg, *args, **kw)

        monkeypatch.setattr(ObjectStore, name, counted)

    def start(self, root: str) -> None:
        """Count from now on, under ``root``."""
        self.remote.clear()
        _OPENED.clear()
        _WATCH[:] = [os.path.abspath(root)]

    def stop(self) -> Counter[str]:
        """The reads counted since start()."""
        _WATCH.clear()
        counts = Counter(_OPENED) + self.remote
        _OPENED.clear()
        return counts


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Reads]:
    """A read counter for local disk, memory:// and S3."""
    yield Reads(monkeypatch)
    _WATCH.clear()
    _OPENED.clear()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("via", [pytest.param("latest", id="through-latest"),
                                 pytest.param("ep_000002", id="checkpoint-dir")])
async def test_load_reads_each_file_once(base_url: str, via: str, reads: Reads) -> None:
    """load_checkpoint reads runtime.json and every file it lists exactly once, nothing else."""
    root = f"{base_url}/checkpoints"
    memory = MemoryLog()
    async with CheckpointWriter(root) as w:
        for ep in (1, 2):
            add_episode(memory, ep)
            snap = snapshot(memory, ep, extra_files={"rng.bin": b"\0" * 100})
            await (await w.submit(snap)).wait()
    local = isinstance(open_store(root)[0], LocalStore)
    reads.start(root)
    loaded = load_checkpoint(f"{root}/{via}")
    counts = reads.stop()
    assert loaded.memory.to_jsonl() == memory.to_jsonl()
    ckpt = os.path.abspath(f"{root}/ep_000002") if local else f"{root}/ep_000002"
    files = {f"{ckpt}/{n}" for n in ("runtime.json", "agent.json", "memory_2.jsonl", "rng.bin")}
    # Through latest, object stores also read latest.json (local disk reads the symlink).
    pointer = {f"{root}/latest.json"} if via == "latest" and not local else set()
    assert counts == Counter(dict.fromkeys(files | pointer, 1))


# -- readers of a live run -------------------------------------------------------------


# Extra file sizes: a large one widens the window retention has to hit a reader (and on
# S3 a multi-MiB body on every request); a small one makes commits fast.
_SMALL, _LARGE = 100, 4 * 2**20


def _live(kind: str, executor: str, size: int, reader: str) -> Any:
    marks = [pytest.mark.s3] if kind == "s3" else []
    return pytest.param(kind, executor, size, reader, marks=marks,
                        id=f"{kind}-{executor}-{'large' if size == _LARGE else 'small'}"
                           f"-reader-{reader}")


class _ThreadReader:
    """A reader thread in this process, the same interface as _live_reader.LiveReader."""

    def __init__(self, location: str, blob: bytes) -> None:
        self.tally = Tally()
        self._stop = threading.Event()
        self._location, self._blob = location, blob
        self._thread = threading.Thread(target=self._poll, name="live-reader")
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    ck = load_checkpoint(self._location)
                except Exception as exc:
                    self.tally.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                finally:
                    self.tally.warnings.extend(str(w.message) for w in seen)
            if ck.extra_files["blob.bin"] != self._blob:
                self.tally.errors.append(f"{ck.path}: blob.bin differs from what was written")
            self.tally.episodes.append(ck.runtime.episode_index)

    @property
    def loads(self) -> int:
        return self.tally.loads

    @property
    def distinct(self) -> int:
        return self.tally.distinct

    @property
    def failures(self) -> int:
        return len(self.tally.errors) + len(self.tally.warnings)

    def stop(self) -> Tally:
        self._stop.set()
        self._thread.join()
        return self.tally


@pytest.mark.parametrize(("kind", "executor", "size", "reader"), [
    _live("local", "thread", _SMALL, "thread"),
    _live("local", "thread", _LARGE, "process"),
    _live("local", "process", _SMALL, "process"),
    _live("local", "process", _LARGE, "thread"),
    _live("memory", "thread", _SMALL, "thread"),
    _live("memory", "thread", _LARGE, "thread"),
    _live("s3", "thread", _SMALL, "process"),
    _live("s3", "thread", _LARGE, "thread"),
    _live("s3", "process", _SMALL, "thread"),
    _live("s3", "process", _LARGE, "process"),
])
def test_reader_of_a_live_run_never_fails_nor_warns(
    kind: str, executor: str, size: int, reader: str, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Polling load_checkpoint(latest) while keep_last=1 retires each checkpoint right
    after the next one lands: every load a complete checkpoint, no error, no warning."""
    root = make_backend(kind, tmp_path, request).url
    # Bounded by work: enough commits, enough loads (a reader process needs a moment to
    # start) of enough different checkpoints, or the cap when the reader stopped loading.
    min_commits, min_loads, min_distinct, max_commits = 15, 15, 3, 3000
    blob = os.urandom(size)
    readers: list[_ThreadReader | LiveReader] = []

    async def write() -> int:
        memory = MemoryLog()
        ep = 0
        async with CheckpointWriter(root, keep_last=1, fsync=False, executor=executor) as w:
            while not readers or (
                ep < max_commits and not readers[0].failures
                and (ep < min_commits or readers[0].loads < min_loads
                     or readers[0].distinct < min_distinct)
            ):
                ep += 1
                add_episode(memory, ep)
                snap = snapshot(memory, ep, extra_files={"blob.bin": blob})
                # Back to back (submit waits only for room in the queue): each commit's
                # retention retires the checkpoint a reader is reading as soon as it can.
                handle = await w.submit(snap)
                if ep == 1:
                    await handle.wait()
                    where = f"{root}/latest"
                    readers.append(LiveReader(where) if reader == "process"
                                   else _ThreadReader(where, blob))
        return ep

    try:
        commits = anyio.run(write)
    finally:
        tally = readers[0].stop() if readers else Tally()
    assert (tally.errors, tally.warnings) == ([], [])
    assert commits >= min_commits
    assert tally.loads >= min_loads
    assert tally.episodes == sorted(tally.episodes)
    assert tally.distinct >= min_distinct


# -- what the writer side asks the reader ----------------------------------------------


def test_scan_lists_complete_checkpoints_oldest_first(run_dir: Path) -> None:
    """scan(store, root) is the writer's start-up listing: every checkpoint, cheap checks."""
    store, root = open_store(run_dir / "checkpoints")
    infos = scan(store, root)
    assert [(i.name, i.complete) for i in infos] == [
        ("ep_000100", True), ("ep_000200", True), ("ep_000300", True)]
    assert infos[2].path == run_dir / "checkpoints" / "ep_000300"


@pytest.mark.parametrize(("damage", "whole"), [
    pytest.param(lambda c: None, True, id="intact"),
    pytest.param(lambda c: (c / "memory_200.jsonl").write_bytes(b"x" * 10), False,
                 id="damaged"),
    pytest.param(lambda c: (c / "agent.json").unlink(), False, id="missing-file"),
])
def test_is_whole_answers_instead_of_raising(run_dir: Path, damage: Any, whole: bool) -> None:
    """is_whole is a full verification that returns False for a broken checkpoint."""
    ckpt = run_dir / "checkpoints" / "ep_000200"
    damage(ckpt)
    store, path = open_store(ckpt)
    assert is_whole(store, path) is whole


def test_is_whole_never_follows_a_symlinked_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    """A .replaced-* symlink to a valid checkpoint outside is not whole: never read."""
    outside = tmp_path / "outside" / "ep_000200"
    shutil.copytree(run_dir / "checkpoints" / "ep_000200", outside)
    link = run_dir / "checkpoints" / ".replaced-ep_000200-0000"
    link.symlink_to(outside)
    store, path = open_store(link)
    assert is_whole(store, path) is False
