"""Object storage specifics: S3 errors, server-side incremental copy, multipart, the lock,
and the reader rules on URLs (fallback, unsafe names, corruption).

S3 runs against moto's server on 127.0.0.1 (see _s3_util); memory:// runs in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from _s3_util import BUCKET, REMOTE_BACKENDS, Backend, make_backend, s3_endpoint  # noqa: F401
from ckptwriter import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
    CheckpointWriter,
    DirectoryLockedError,
    MemoryLog,
    Observation,
    StorageError,
    UnsafePathError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.commit import CommitPipeline
from ckptwriter.retention import KeepAll
from ckptwriter.storage import open_backend
from ckptwriter.storage.remote import RemoteStorage
from ckptwriter.storage.urlpath import URLPath
from conftest import add_episode, open_dir, snapshot

MIB = 2**20


@pytest.fixture
def anyio_backend() -> str:
    """Storage behaviour does not depend on the event loop; the contract suite runs trio."""
    return "asyncio"


@pytest.fixture(params=REMOTE_BACKENDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh checkpoints prefix on memory:// and on S3."""
    return make_backend(str(request.param), tmp_path, request)


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh checkpoints prefix on S3."""
    return make_backend("s3", tmp_path, request)


def big_memory(nbytes: int) -> MemoryLog:
    """A memory log of about ``nbytes`` encoded bytes."""
    memory = MemoryLog()
    line = "x" * 1000
    for i in range(nbytes // 1040 + 1):
        memory.append(Observation(content=f"{i} {line}"))
    return memory


def write_sync(url: str, memory: MemoryLog, episodes: list[int]) -> list[bool]:
    """Commit each episode with the sync writer; return whether each was incremental."""
    from ckptwriter import SyncCheckpointWriter

    out = []
    with SyncCheckpointWriter(url) as w:
        for ep in episodes:
            add_episode(memory, ep)
            out.append(w.submit(snapshot(memory, ep)).wait().incremental)
    return out


# -- S3 errors -----------------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.anyio
@pytest.mark.usefixtures("s3_endpoint")
async def test_missing_bucket_is_named_with_the_fix() -> None:
    """A writer on a bucket that does not exist says which one and how to create it."""
    url = "s3://no-such-bucket-ckpt/run/checkpoints"
    with pytest.raises(
        StorageError,
        match=r"^bucket 'no-such-bucket-ckpt' does not exist .* while opening "
              r"s3://no-such-bucket-ckpt/run/checkpoints: create it "
              r"\(e\.g\. `aws s3 mb s3://no-such-bucket-ckpt`\)",
    ):
        async with CheckpointWriter(url):
            pass


@pytest.mark.s3
@pytest.mark.usefixtures("s3_endpoint")
def test_missing_bucket_on_resume_is_a_storage_error() -> None:
    """resume_from on a missing bucket reports the bucket, not 'checkpoint not found'."""
    with pytest.raises(StorageError, match=r"^bucket 'no-such-bucket-ckpt' does not exist"):
        resolve_checkpoint("s3://no-such-bucket-ckpt/run/checkpoints")


@pytest.mark.s3
@pytest.mark.usefixtures("s3_endpoint")
def test_missing_credentials_name_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without credentials the error says which environment variables to set."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    storage = RemoteStorage(f"s3://{BUCKET}/nocreds", skip_instance_cache=True)
    with pytest.raises(
        StorageError,
        match=rf"^Unable to locate credentials while opening s3://{BUCKET}/nocreds: "
              r"no usable credentials were found: set AWS_ACCESS_KEY_ID",
    ):
        open_dir(storage)


@pytest.mark.s3
def test_storage_options_reach_s3fs(s3: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit storage options (endpoint, keys) work without the environment."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    storage = open_backend(s3.url, storage_options={
        "skip_instance_cache": True, "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint},
    })
    assert open_dir(storage) == []
    storage.close()


# -- incremental memory and multipart ------------------------------------------------


@pytest.mark.s3
def test_s3_incremental_copies_the_prefix_server_side(s3: Backend) -> None:
    """The second checkpoint uploads only the new bytes; the file is still exact."""
    memory = big_memory(6 * MIB)
    assert write_sync(s3.url, memory, [1, 2]) == [False, True]
    loaded = load_checkpoint(s3.url)
    assert loaded.memory.to_jsonl() == memory.to_jsonl()
    assert verify_checkpoint(f"{s3.url}/ep_000002").files["memory_2.jsonl"].bytes == memory.nbytes


@pytest.mark.s3
def test_s3_incremental_reports_only_new_bytes(s3: Backend) -> None:
    """bytes_serialized counts the appended bytes only, when the prefix is copied."""
    from ckptwriter import SyncCheckpointWriter

    memory = big_memory(6 * MIB)
    with SyncCheckpointWriter(s3.url) as w:
        w.submit(snapshot(memory, 1)).wait()
        before = memory.nbytes
        add_episode(memory, 2)
        result = w.submit(snapshot(memory, 2)).wait()
    assert (result.incremental, result.bytes_serialized) == (True, memory.nbytes - before)


@pytest.mark.s3
def test_s3_incremental_falls_back_when_the_previous_file_changed(s3: Backend) -> None:
    """If the previous memory object was altered, the next one is uploaded in full."""
    from ckptwriter import SyncCheckpointWriter

    memory = big_memory(6 * MIB)
    with SyncCheckpointWriter(s3.url) as w:
        w.submit(snapshot(memory, 1)).wait()
        old = s3.read_raw("ep_000001/memory_1.jsonl")
        s3.write_raw("ep_000001/memory_1.jsonl", old[:-2] + b"!\n")
        add_episode(memory, 2)
        result = w.submit(snapshot(memory, 2)).wait()
    assert result.incremental is False
    assert load_checkpoint(s3.url).memory.to_jsonl() == memory.to_jsonl()


def test_memory_store_falls_back_to_full_upload(tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    """A store without server-side copy writes every memory file in full."""
    backend = make_backend("memory", tmp_path, request)
    assert write_sync(backend.url, big_memory(6 * MIB), [1, 2]) == [False, False]


@pytest.mark.s3
def test_s3_large_memory_goes_up_in_multipart_parts(s3: Backend) -> None:
    """A memory file above the multipart threshold is uploaded in parts, byte-exact."""
    memory = big_memory(20 * MIB)
    write_sync(s3.url, memory, [1])
    s3.fs.invalidate_cache()
    etag = s3.fs.info(f"{s3.root}/ep_000001/memory_1.jsonl")["ETag"]
    assert etag.strip('"').endswith("-3")
    assert load_checkpoint(s3.url).memory.to_jsonl() == memory.to_jsonl()


# -- the writer lock -----------------------------------------------------------------


def lock_body(owner: str, expires_in: float) -> bytes:
    """A lock object as another writer would have written it."""
    return json.dumps({"owner": owner, "token": "other", "expires_at": time.time() + expires_in,
                       "ttl_seconds": 60}).encode()


def test_live_lock_of_another_writer_names_it(remote: Backend) -> None:
    """A lock another writer keeps alive is refused, with its owner and expiry."""
    remote.write_raw(".lock", lock_body("pid 7 on trainer-3", 50))
    with pytest.raises(
        DirectoryLockedError,
        match=r"^Checkpoint directory .* is locked by another writer \(pid 7 on trainer-3; "
              r"the lock expires in (49|50) s",
    ):
        open_dir(RemoteStorage(remote.url))


def test_expired_lock_is_taken_over(remote: Backend) -> None:
    """The lock of a writer that stopped heartbeating is taken over after its expiry."""
    remote.write_raw(".lock", lock_body("pid 7 on crashed-host", -1))
    storage = RemoteStorage(remote.url)
    open_dir(storage)
    try:
        assert json.loads(remote.read_raw(".lock"))["owner"] != "pid 7 on crashed-host"
    finally:
        storage.close()


def test_heartbeat_extends_the_lock(remote: Backend) -> None:
    """A live writer pushes its lock's expiry forward while it runs."""
    storage = RemoteStorage(remote.url, lock_ttl=0.3)
    open_dir(storage)
    try:
        first = json.loads(remote.read_raw(".lock"))["expires_at"]
        deadline = time.monotonic() + 10
        while json.loads(remote.read_raw(".lock"))["expires_at"] == first:
            assert time.monotonic() < deadline, "the lock was never renewed"
            time.sleep(0.05)
    finally:
        storage.close()


def test_writer_that_lost_its_lock_stops_committing(remote: Backend) -> None:
    """If another writer takes the lock over, this one refuses to commit."""
    storage = RemoteStorage(remote.url)
    pipeline = CommitPipeline(storage, KeepAll())
    pipeline.open()
    try:
        remote.write_raw(".lock", lock_body("pid 9 on usurper", 60))
        with pytest.raises(DirectoryLockedError, match=r"^This writer lost the lock on "):
            pipeline.persist(snapshot(MemoryLog(), 1).capture())
    finally:
        storage.close()
    assert json.loads(remote.read_raw(".lock"))["owner"] == "pid 9 on usurper"
    assert "ep_000001/runtime.json" not in remote.names()


def test_two_writers_starting_at_once_exactly_one_wins(remote: Backend) -> None:
    """Racing lock creation: one writer opens, the other gets DirectoryLockedError."""
    barrier = threading.Barrier(2)
    outcomes: list[str] = []
    storages = [RemoteStorage(remote.url), RemoteStorage(remote.url)]

    def start(storage: RemoteStorage) -> None:
        barrier.wait()
        try:
            open_dir(storage)
            outcomes.append("opened")
        except DirectoryLockedError:
            outcomes.append("locked")

    threads = [threading.Thread(target=start, args=(s,)) for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in storages:
        s.close()
    assert sorted(outcomes) == ["locked", "opened"]


def test_close_releases_the_lock(remote: Backend) -> None:
    """A writer removes its lock object when it closes."""
    storage = RemoteStorage(remote.url)
    open_dir(storage)
    storage.close()
    assert ".lock" not in remote.names()


# -- the reader on URLs --------------------------------------------------------------


def test_broken_latest_json_falls_back_with_a_warning(remote: Backend) -> None:
    """An unreadable latest.json makes resume use the newest valid checkpoint, warning."""
    write_sync(remote.url, MemoryLog(), [1, 2])
    remote.write_raw("latest.json", b"{not json")
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest.json is invalid; falling back"):
        path = resolve_checkpoint(remote.url)
    assert str(path) == f"{remote.url}/ep_000002"


def test_latest_json_pointing_outside_is_refused(remote: Backend) -> None:
    """latest.json may only name a checkpoint inside its own prefix."""
    write_sync(remote.url, MemoryLog(), [1])
    remote.write_raw("latest.json", b'{"checkpoint": "../other/ep_000001", "episode_index": 1}')
    with pytest.raises(UnsafePathError, match=r"^Checkpoint .* is broken: latest.json: names"):
        resolve_checkpoint(remote.url)


def test_manifest_file_names_escaping_the_prefix_are_refused(remote: Backend) -> None:
    """A runtime.json listing '../x' is rejected, never read."""
    write_sync(remote.url, MemoryLog(), [1])
    rt = json.loads(remote.read_raw("ep_000001/runtime.json"))
    rt["files"]["../../secret"] = rt["files"]["agent.json"]
    remote.write_raw("ep_000001/runtime.json", json.dumps(rt).encode())
    with pytest.raises(UnsafePathError, match=r"^Checkpoint .*ep_000001 is broken: runtime.json"):
        verify_checkpoint(f"{remote.url}/ep_000001")


def test_damaged_memory_object_fails_verification(remote: Backend) -> None:
    """Same size, different bytes: the sha256 check names the file."""
    write_sync(remote.url, MemoryLog(), [1])
    data = remote.read_raw("ep_000001/memory_1.jsonl")
    remote.write_raw("ep_000001/memory_1.jsonl", data.replace(b"Solve", b"Salve"))
    with pytest.raises(
        CheckpointCorruptError,
        match=r"^Checkpoint .*ep_000001 is broken: memory_1.jsonl: sha256 does not match",
    ):
        verify_checkpoint(f"{remote.url}/ep_000001")


def test_damaged_latest_falls_back_to_the_previous(remote: Backend) -> None:
    """Loading through latest skips a damaged newest checkpoint, with a warning."""
    write_sync(remote.url, MemoryLog(), [1, 2])
    data = remote.read_raw("ep_000002/memory_2.jsonl")
    remote.write_raw("ep_000002/memory_2.jsonl", data.replace(b"Solve", b"Salve"))
    with pytest.warns(CheckpointFallbackWarning, match=r"^latest points at ep_000002, which is"):
        loaded = load_checkpoint(remote.url)
    assert loaded.runtime.episode_index == 1


def test_unknown_prefix_lists_checkpoints_nearby(remote: Backend) -> None:
    """A wrong resume_from names the checkpoints that do exist close to it."""
    write_sync(remote.url, MemoryLog(), [1])
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint(f"{remote.url}/ep_000009")
    assert info.value.nearby == [f"{remote.url}/ep_000001"]


def test_size_mismatch_is_listed_as_incomplete(remote: Backend) -> None:
    """ls shows a committed checkpoint whose object lost bytes, with the problem."""
    write_sync(remote.url, MemoryLog(), [1])
    remote.write_raw("ep_000001/agent.json", b"{}")
    [info] = list_checkpoints(remote.url)
    assert info.complete is False
    assert info.problem is not None
    assert info.problem.startswith("agent.json: size 2 bytes, expected ")


def test_url_path_round_trips_through_the_reader(remote: Backend) -> None:
    """The Path a URL resolves to prints as the URL and resolves again to itself."""
    write_sync(remote.url, MemoryLog(), [1])
    path = resolve_checkpoint(remote.url)
    assert isinstance(path, URLPath)
    assert (path.name, str(path.parent), os.fspath(path)) == (
        "ep_000001", remote.url, f"{remote.url}/ep_000001")
    assert resolve_checkpoint(path) == path


def test_file_url_reads_local_checkpoints(tmp_path: Path) -> None:
    """file:// URLs are local directories, with the local rules."""
    write_sync(str(tmp_path / "ck"), MemoryLog(), [1])
    assert resolve_checkpoint(f"file://{tmp_path}/ck") == tmp_path / "ck" / "ep_000001"


_CRASHING_CHILD = textwrap.dedent("""
    import os, sys
    from ckptwriter import MemoryLog, Observation, Snapshot
    from ckptwriter.commit import CommitPipeline
    from ckptwriter.retention import KeepAll
    from ckptwriter.storage.remote import RemoteStorage

    class DiesBeforeMarker(RemoteStorage):
        def _step(self, name):
            if name == "files_written" and self.dying:
                os._exit(3)

    # A lease long enough for a busy machine to finish two commits under it.
    storage = DiesBeforeMarker(sys.argv[1], lock_ttl=3.0)
    storage.dying = False
    pipeline = CommitPipeline(storage, KeepAll())
    pipeline.open()
    memory = MemoryLog([Observation(content="first")])
    pipeline.persist(Snapshot(1, 1, "A", memory).capture())
    storage.dying = True
    memory.append(Observation(content="second"))
    pipeline.persist(Snapshot(2, 2, "A", memory).capture())
""")


@pytest.mark.s3
def test_killed_writer_leaves_nothing_a_successor_keeps(s3: Backend) -> None:
    """A process killed mid-commit: readers ignore its objects; the next writer waits out
    its lock, takes over and removes them."""
    child = subprocess.run([sys.executable, "-c", _CRASHING_CHILD, s3.url], timeout=60,
                           capture_output=True, text=True)
    assert child.returncode == 3, child.stderr
    assert {"ep_000002/memory_2.jsonl", ".lock"} <= s3.names()
    assert [i.name for i in list_checkpoints(s3.url)] == ["ep_000001"]
    successor = RemoteStorage(s3.url)
    deadline = time.monotonic() + 60
    while True:
        try:
            assert [r.name for r in open_dir(successor)] == ["ep_000001"]
            break
        except DirectoryLockedError:
            assert time.monotonic() < deadline, "the dead writer's lock never expired"
            time.sleep(0.1)
    successor.close()
    assert not any(n.startswith("ep_000002") for n in s3.names())
