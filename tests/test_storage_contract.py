"""The storage contract, one suite for every backend: local disk, memory:// and S3 (moto).

Each test runs the public API (CheckpointWriter, resolve/load/verify/list) against a
fresh checkpoints location of one backend; the S3 one is a real HTTP endpoint on
127.0.0.1 reached through s3fs and ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _s3_util import BACKENDS, Backend, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import (
    CheckpointWriter,
    DirectoryLockedError,
    MemoryLog,
    WriterFailedError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.storage import Backend as Storage
from ckptwriter.storage import LocalStorage
from ckptwriter.storage.remote import RemoteStorage
from conftest import add_episode, open_dir, snapshot

pytestmark = pytest.mark.anyio


# Every backend on asyncio, and the remote ones on trio too (the local backend runs on
# trio throughout the core writer tests already).
_COMBOS = [
    pytest.param(("asyncio", p.values[0]), id=f"asyncio-{p.id}", marks=p.marks)
    for p in BACKENDS
] + [
    pytest.param(("trio", p.values[0]), id=f"trio-{p.id}", marks=p.marks)
    for p in BACKENDS if p.values[0] != "local"
]


@pytest.fixture(params=_COMBOS)
def combo(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(event loop, storage backend) of one run of the contract."""
    loop, kind = request.param
    return str(loop), str(kind)


@pytest.fixture
def anyio_backend(combo: tuple[str, str]) -> str:
    """The event loop the writer runs on."""
    return combo[0]


@pytest.fixture
def backend(combo: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh, empty checkpoints location on each backend."""
    return make_backend(combo[1], tmp_path, request)


class _Crash(Exception):
    """Stands in for the process dying at a protocol step."""


def crashing_storage(backend: Backend, step: str) -> Storage:
    """The backend's storage, raising right after the protocol step ``step``."""
    base: Any = LocalStorage if backend.fs is None else RemoteStorage

    class Crashing(base):  # type: ignore[misc, valid-type]
        def _step(self, name: str) -> None:
            if name == step:
                raise _Crash(name)

    storage: Storage = Crashing(backend.url)
    return storage


async def write_episodes(
    url: str, episodes: list[int], memory: MemoryLog | None = None, **kw: Any
) -> MemoryLog:
    """Run a writer that checkpoints each episode (scores from ``kw['scores']``)."""
    memory = memory if memory is not None else MemoryLog()
    scores: dict[int, float] = kw.pop("scores", {})
    async with CheckpointWriter(url, **kw) as w:
        for ep in episodes:
            add_episode(memory, ep)
            await (await w.submit(snapshot(memory, ep, val_score=scores.get(ep)))).wait()
    return memory


def complete_names(url: str) -> list[str]:
    """Names of the checkpoints readers accept, oldest first."""
    return [i.name for i in list_checkpoints(url) if i.complete]


async def test_commit_writes_a_verified_checkpoint(backend: Backend) -> None:
    """A committed checkpoint has its three files and passes verification."""
    await write_episodes(backend.url, [1])
    assert {"ep_000001/runtime.json", "ep_000001/agent.json",
            "ep_000001/memory_1.jsonl"} <= backend.names()
    assert verify_checkpoint(f"{backend.url}/ep_000001").episode_index == 1


async def test_result_path_names_the_checkpoint_location(backend: Backend) -> None:
    """The result's path is the checkpoint under the given location, URL kept intact."""
    async with CheckpointWriter(backend.url) as w:
        result = await (await w.submit(snapshot(MemoryLog(), 3))).wait()
    assert result.path == f"{backend.url}/ep_000003"
    assert str(resolve_checkpoint(backend.url)) == result.path


async def test_latest_json_names_the_newest_checkpoint(backend: Backend) -> None:
    """latest.json points at the last committed checkpoint and resolve follows it."""
    await write_episodes(backend.url, [1, 2, 3])
    assert json.loads(backend.read_raw("latest.json"))["checkpoint"] == "ep_000003"
    assert Path(resolve_checkpoint(backend.url)).name == "ep_000003"


async def test_latest_json_url_resolves_like_the_directory(backend: Backend) -> None:
    """resume_from may name latest.json itself."""
    await write_episodes(backend.url, [1, 2])
    assert str(resolve_checkpoint(f"{backend.url}/latest.json")) == f"{backend.url}/ep_000002"


async def test_retention_last_n_keeps_the_newest(backend: Backend) -> None:
    """keep_last=2 leaves the two newest checkpoints and nothing of the others."""
    await write_episodes(backend.url, [1, 2, 3, 4], keep_last=2)
    assert complete_names(backend.url) == ["ep_000003", "ep_000004"]
    assert not any(n.startswith(("ep_000001", "ep_000002")) for n in backend.names())


async def test_retention_top_k_val_keeps_the_best_and_the_latest(backend: Backend) -> None:
    """top_k_val keeps the K best scores and always the latest."""
    scores = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.2}
    await write_episodes(backend.url, [1, 2, 3, 4], strategy="top_k_val", keep_last=2,
                         scores=scores)
    assert complete_names(backend.url) == ["ep_000001", "ep_000003", "ep_000004"]


async def test_resume_round_trip_is_byte_identical(backend: Backend) -> None:
    """Loading returns the memory bytes, the manifest and the extra files as written."""
    memory = MemoryLog(memory_type="history")
    for ep in range(1, 40):
        add_episode(memory, ep, reflect=True)
    async with CheckpointWriter(backend.url) as w:
        snap = snapshot(memory, 39, extra_files={"optimizer.json": {"lr": 0.5}, "rng.bin": b"\0\1"})
        await (await w.submit(snap)).wait()
    loaded = load_checkpoint(backend.url, expected_memory_type="history")
    assert loaded.memory.to_jsonl() == memory.to_jsonl()
    assert loaded.extra_files == {"optimizer.json": b'{"lr":0.5}', "rng.bin": b"\0\1"}
    assert (loaded.runtime.episode_index, loaded.agent.agent_type) == (39, "HistoryAgent")


async def test_incremental_memory_files_are_each_exact(backend: Backend) -> None:
    """Every checkpoint of a growing memory holds exactly the log as it was at capture."""
    memory = MemoryLog()
    expected: dict[int, bytes] = {}
    async with CheckpointWriter(backend.url) as w:
        for ep in range(1, 6):
            for i in range(50 * ep):
                add_episode(memory, i)
            expected[ep] = memory.to_jsonl()
            await (await w.submit(snapshot(memory, ep))).wait()
    for ep, data in expected.items():
        assert load_checkpoint(f"{backend.url}/ep_{ep:06d}").memory.to_jsonl() == data


async def test_resumed_run_continues_in_the_same_location(backend: Backend) -> None:
    """A second writer (another machine) picks up after the first's checkpoints."""
    memory = await write_episodes(backend.url, [1, 2])
    resumed = load_checkpoint(backend.url).memory
    assert resumed.to_jsonl() == memory.to_jsonl()
    await write_episodes(backend.url, [3], memory=resumed)
    assert complete_names(backend.url) == ["ep_000001", "ep_000002", "ep_000003"]
    assert len(load_checkpoint(backend.url).memory) == len(memory) + 3


async def test_uncommitted_checkpoint_is_invisible_to_readers(backend: Backend) -> None:
    """Objects a dead writer left without the commit marker are never resumed from."""
    await write_episodes(backend.url, [1])
    dead = backend.crash_artifact("ep_000002")
    backend.write_raw(f"{dead}/memory_2.jsonl", b'{"type":"Action","content":"x"}\n')
    backend.write_raw(f"{dead}/agent.json", b"{}")
    assert complete_names(backend.url) == ["ep_000001"]
    assert Path(resolve_checkpoint(backend.url)).name == "ep_000001"


async def test_uncommitted_checkpoint_is_cleaned_by_the_next_writer(backend: Backend) -> None:
    """Opening a writer removes everything a dead writer left uncommitted."""
    await write_episodes(backend.url, [1])
    dead = backend.crash_artifact("ep_000002")
    backend.write_raw(f"{dead}/memory_2.jsonl", b"partial")
    async with CheckpointWriter(backend.url):
        pass
    assert not any(n.startswith(dead) for n in backend.names())
    assert complete_names(backend.url) == ["ep_000001"]


async def crash_second_commit(backend: Backend, local_step: str, remote_step: str) -> None:
    """Commit episode 1, then die at a protocol step of episode 2's commit."""
    await write_episodes(backend.url, [1])
    memory = MemoryLog()
    add_episode(memory, 2)
    step = local_step if backend.fs is None else remote_step
    with pytest.raises(WriterFailedError, match=r"^checkpoint for episode 2 failed"):
        async with CheckpointWriter(storage=crashing_storage(backend, step)) as w:
            await w.submit(snapshot(memory, 2))


async def test_crash_before_the_marker_leaves_no_checkpoint(backend: Backend) -> None:
    """Dying after every object but the commit marker: the checkpoint does not exist."""
    await crash_second_commit(backend, "runtime_written", "files_written")
    assert complete_names(backend.url) == ["ep_000001"]
    assert Path(resolve_checkpoint(backend.url)).name == "ep_000001"


async def test_crash_after_the_marker_keeps_latest_on_the_previous(backend: Backend) -> None:
    """Dying after the commit but before latest moves: listed, but latest is unchanged."""
    await crash_second_commit(backend, "parent_synced", "marker_written")
    assert complete_names(backend.url) == ["ep_000001", "ep_000002"]
    assert Path(resolve_checkpoint(backend.url)).name == "ep_000001"


async def test_crash_during_delete_hides_the_checkpoint(backend: Backend) -> None:
    """A deletion that dies half-way leaves no checkpoint readers would use."""
    await write_episodes(backend.url, [1, 2])
    step = "trash_renamed" if backend.fs is None else "marker_deleted"
    storage = crashing_storage(backend, step)
    open_dir(storage)
    try:
        with pytest.raises(_Crash):
            storage.delete("ep_000001")
    finally:
        storage.close()
    assert complete_names(backend.url) == ["ep_000002"]
    async with CheckpointWriter(backend.url):
        pass
    assert not any("ep_000001" in n for n in backend.names())


async def test_second_writer_on_the_same_location_is_refused(backend: Backend) -> None:
    """Only one writer may own a checkpoints location at a time."""
    async with CheckpointWriter(backend.url):
        with pytest.raises(DirectoryLockedError, match=r"^Checkpoint directory .* is locked"):
            async with CheckpointWriter(backend.url):
                pass


async def test_location_is_free_again_after_close(backend: Backend) -> None:
    """Closing a writer releases its lock for the next one."""
    await write_episodes(backend.url, [1])
    await write_episodes(backend.url, [2])
    assert complete_names(backend.url) == ["ep_000001", "ep_000002"]
