"""The object-storage backend's primitives, driven directly (begin/write/finalize/discard,
can_reuse, replace_pointer, delete) on memory:// and on S3 (moto, see _s3_util).

The commit pipeline normally drives them; here each test plays the pipeline's part, so a
runtime.json is built by hand with the fields RuntimeManifest needs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from _s3_util import REMOTE_BACKENDS, Backend, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import (
    DirectoryLockedError,
    MemoryLog,
    Observation,
    StorageError,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from ckptwriter.layout import FORMAT_VERSION, memory_file_name
from ckptwriter.manifest import dump_json
from ckptwriter.storage.base import FileSpec, ReuseToken
from ckptwriter.storage.remote import RemoteStorage

MIB = 2**20
AGENT_JSON = dump_json({"agent_type": "A", "memory_type": "history", "config": {}})


@pytest.fixture(params=REMOTE_BACKENDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh checkpoints prefix on memory:// and on S3."""
    return make_backend(str(request.param), tmp_path, request)


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh checkpoints prefix on S3."""
    return make_backend("s3", tmp_path, request)


class _Crash(Exception):
    """Stands in for the process dying at a protocol step."""


@contextmanager
def opened(url: str, crash_at: str | None = None) -> Iterator[RemoteStorage]:
    """An opened backend (lock held) that raises _Crash right after step ``crash_at``."""

    class Crashing(RemoteStorage):
        def _step(self, name: str) -> None:
            if name == crash_at:
                raise _Crash(name)

    storage = Crashing(url)
    storage.open(lambda _path: False)
    try:
        yield storage
    finally:
        storage.close()


def memory_bytes(entries: int, start: int = 0, size: int = 100) -> bytes:
    """``entries`` JSONL memory lines of about ``size`` bytes each."""
    log = MemoryLog([Observation(content=f"{start + i} {'x' * size}") for i in range(entries)])
    return log.to_jsonl()


def runtime_json(episode: int, files: dict[str, bytes]) -> bytes:
    """A valid runtime.json for a checkpoint holding ``files``."""
    return dump_json({
        "timestamp": "2024-01-15T10:30:45.123456Z",
        "episode_index": episode,
        "train_steps_total": episode,
        "agent_type": "A",
        "memory_snapshot_path": memory_file_name(episode),
        "val_score": None,
        "format_version": FORMAT_VERSION,
        "memory_entries": files[memory_file_name(episode)].count(b"\n"),
        "resumed_from": None,
        "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for n, d in files.items()},
    })


def commit(
    storage: RemoteStorage, episode: int, memory: bytes, *,
    reuse: ReuseToken | None = None, extra: dict[str, bytes] | None = None,
) -> tuple[str, ReuseToken]:
    """Write one checkpoint as the pipeline does; its path and the memory file's token.

    With ``reuse``, ``memory`` is the whole file but only the bytes after the token's
    prefix are handed over.
    """
    name = f"ep_{episode:06d}"
    mem_name = memory_file_name(episode)
    delta = memory[reuse.nbytes:] if reuse is not None else memory
    files = {mem_name: memory, "agent.json": AGENT_JSON, **(extra or {})}
    pending = storage.begin(name)
    try:
        tokens = pending.write([FileSpec(mem_name, [memoryview(delta)], reuse)])
        pending.write([FileSpec(n, [d]) for n, d in files.items() if n != mem_name])
        path = pending.finalize(runtime_json(episode, files))
    except BaseException:
        pending.discard()
        raise
    return path, tokens[mem_name]


def checkpoint_names(url: str) -> list[str]:
    """Checkpoints readers list, complete or not."""
    return [i.name for i in list_checkpoints(url)]


@contextmanager
def recorded_s3_calls(storage: RemoteStorage) -> Iterator[list[tuple[str, str, int]]]:
    """Every S3 request the backend makes: (method, key, bytes of its body)."""
    calls: list[tuple[str, str, int]] = []
    fs = storage.store.fs
    original: Callable[..., Any] = fs._call_s3

    async def spy(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, str(kwargs.get("Key", "")), len(kwargs.get("Body", b""))))
        return await original(method, *args, **kwargs)

    fs._call_s3 = spy
    try:
        yield calls
    finally:
        del fs._call_s3


# -- begin / write / finalize / discard ----------------------------------------------


def test_finalized_checkpoint_passes_verification(remote: Backend) -> None:
    """begin, write, finalize with a valid runtime.json: a checkpoint readers verify."""
    with opened(remote.url) as storage:
        path, _ = commit(storage, 1, memory_bytes(10))
    assert path == f"{remote.url}/ep_000001"
    assert verify_checkpoint(path).episode_index == 1
    assert checkpoint_names(remote.url) == ["ep_000001"]


def test_written_files_are_invisible_until_finalize(remote: Backend) -> None:
    """Objects uploaded by write() do not make a checkpoint readers list."""
    with opened(remote.url) as storage:
        pending = storage.begin("ep_000001")
        pending.write([FileSpec(memory_file_name(1), [memory_bytes(3)]),
                       FileSpec("agent.json", [AGENT_JSON])])
        assert "ep_000001/memory_1.jsonl" in remote.names()
        assert checkpoint_names(remote.url) == []
        pending.discard()


def test_write_returns_a_token_per_file(remote: Backend) -> None:
    """Each written file gets a token naming its store path, size and tag."""
    data = memory_bytes(5)
    with opened(remote.url) as storage:
        pending = storage.begin("ep_000001")
        tokens = pending.write([FileSpec(memory_file_name(1), [data[:7], data[7:]]),
                                FileSpec("agent.json", [AGENT_JSON])])
        pending.discard()
    assert sorted(tokens) == ["agent.json", "memory_1.jsonl"]
    token = tokens["memory_1.jsonl"]
    assert (token.path, token.nbytes) == (f"{remote.root}/ep_000001/memory_1.jsonl", len(data))
    assert len(token.ident) == 1


def test_discard_leaves_nothing(remote: Backend) -> None:
    """A discarded checkpoint leaves no object under its prefix."""
    with opened(remote.url) as storage:
        pending = storage.begin("ep_000001")
        pending.write([FileSpec(memory_file_name(1), [memory_bytes(3)]),
                       FileSpec("agent.json", [AGENT_JSON])])
        pending.discard()
        assert not any(n.startswith("ep_000001") for n in remote.names())


def test_discard_after_a_crash_past_the_marker_keeps_the_checkpoint(remote: Backend) -> None:
    """Once its marker is written a checkpoint exists: discard() no longer removes it."""
    with opened(remote.url, crash_at="marker_written") as storage, pytest.raises(_Crash):
        commit(storage, 1, memory_bytes(3))
    assert checkpoint_names(remote.url) == ["ep_000001"]


def test_finalize_refuses_after_the_lock_was_taken_over(remote: Backend) -> None:
    """A writer whose lock was taken over writes no marker, and discard deletes nothing."""
    with opened(remote.url) as storage:
        pending = storage.begin("ep_000001")
        pending.write([FileSpec(memory_file_name(1), [memory_bytes(3)])])
        remote.write_raw(".lock", json.dumps({
            "owner": "pid 9 on usurper", "token": "other",
            "expires_at": time.time() + 60, "ttl_seconds": 60}).encode())
        with pytest.raises(DirectoryLockedError, match=r"^This writer lost the lock on "):
            pending.finalize(b"{}")
        pending.discard()
    assert "ep_000001/runtime.json" not in remote.names()
    assert "ep_000001/memory_1.jsonl" in remote.names()


def test_open_removes_uncommitted_prefixes(remote: Backend) -> None:
    """open() removes a prefix without a marker and keeps committed checkpoints."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3))
    remote.write_raw("ep_000002/memory_2.jsonl", b"partial")
    with opened(remote.url):
        pass
    assert not any(n.startswith("ep_000002") for n in remote.names())
    assert checkpoint_names(remote.url) == ["ep_000001"]


def test_recommit_with_other_files_is_refused_and_keeps_the_old(remote: Backend) -> None:
    """Writing a committed name again with other bytes is refused; the old one stays whole."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3), extra={"notes.txt": b"old"})
        before = {n: remote.read_raw(n) for n in remote.names() if n.startswith("ep_")}
        with pytest.raises(StorageError, match=(
            r"^ep_000001 already exists in .* with other content \(memory_1.jsonl: "
            r"\d+ bytes, the existing one \d+ bytes\)\. On object storage a committed "
            r"checkpoint is never replaced by a different one: .* The existing ep_000001 "
            r"is kept as it is; commit under another episode index, or delete .*ep_000001 "
            r"first\.$")):
            commit(storage, 1, memory_bytes(5))
    assert {n: remote.read_raw(n) for n in remote.names() if n.startswith("ep_")} == before
    assert verify_checkpoint(f"{remote.url}/ep_000001").memory_entries == 3


def test_recommit_with_same_size_other_bytes_is_refused(remote: Backend) -> None:
    """Same sizes, other sha256 (known only from the new marker): refused, old kept."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3))
        with pytest.raises(StorageError, match=r"^ep_000001 already exists in .* with "
                                                r"other content \(agent.json: other bytes\)"):
            commit(storage, 1, memory_bytes(3), extra={"agent.json": AGENT_JSON.upper()})
    assert verify_checkpoint(f"{remote.url}/ep_000001").memory_entries == 3
    assert remote.read_raw("ep_000001/agent.json") == AGENT_JSON


def test_recommit_with_the_same_files_rewrites_only_the_marker(remote: Backend) -> None:
    """A retry (same files, new runtime.json) uploads no file and replaces the marker."""
    memory = memory_bytes(3)
    with opened(remote.url) as storage:
        commit(storage, 1, memory)
        uploaded = {n: remote.read_raw(n) for n in ("ep_000001/memory_1.jsonl",
                                                    "ep_000001/agent.json")}
        pending = storage.begin("ep_000001")
        pending.write([FileSpec(memory_file_name(1), [memory])])
        pending.write([FileSpec("agent.json", [AGENT_JSON])])
        marker = runtime_json(1, {memory_file_name(1): memory, "agent.json": AGENT_JSON})
        marker = marker.replace(b"2024-01-15", b"2025-02-16")
        pending.finalize(marker)
    assert remote.read_raw("ep_000001/runtime.json") == marker
    assert {n: remote.read_raw(n) for n in uploaded} == uploaded
    assert verify_checkpoint(f"{remote.url}/ep_000001").timestamp.startswith("2025-02-16")


@pytest.mark.s3
def test_s3_retry_uploads_nothing_but_the_marker(s3: Backend) -> None:
    """On S3 the identical re-commit makes no upload of any file, only the marker PUT."""
    memory = memory_bytes(6 * 1024, size=1000)
    with opened(s3.url) as storage:
        _, token = commit(storage, 1, memory)
        with recorded_s3_calls(storage) as calls:
            path, again = commit(storage, 1, memory, reuse=token)
    writes = [(m, key) for m, key, _ in calls
              if m in {"put_object", "create_multipart_upload", "upload_part_copy"}]
    assert [key.rpartition("/")[2] for _, key in writes] == [".lock", "runtime.json"]
    assert again == token
    assert verify_checkpoint(path).files["memory_1.jsonl"].bytes == len(memory)


def test_discarded_recommit_keeps_the_old_one(remote: Backend) -> None:
    """A re-commit discarded before any write leaves the committed checkpoint whole."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3))
        storage.begin("ep_000001").discard()
    assert verify_checkpoint(f"{remote.url}/ep_000001").memory_entries == 3


def test_recommit_over_a_broken_checkpoint_replaces_it(remote: Backend) -> None:
    """A committed name missing one of its files loads for nobody: it may be rewritten."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3))
        remote.fs.rm_file(f"{remote.root}/ep_000001/agent.json")
        path, _ = commit(storage, 1, memory_bytes(5))
    assert verify_checkpoint(path).memory_entries == 5


# -- reuse ---------------------------------------------------------------------------


def test_memory_store_never_reuses(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A store without server-side copy says no, whatever the file's size."""
    backend = make_backend("memory", tmp_path, request)
    with opened(backend.url) as storage:
        _, token = commit(storage, 1, memory_bytes(6 * 1024, size=1000))
        assert storage.can_reuse(token) is False


@pytest.mark.s3
def test_s3_reuses_an_intact_object_of_5_mib_or_more(s3: Backend) -> None:
    """An unchanged previous object of at least 5 MiB can be reused, a smaller one not."""
    with opened(s3.url) as storage:
        _, small = commit(storage, 1, memory_bytes(10))
        _, large = commit(storage, 2, memory_bytes(6 * 1024, size=1000))
        assert (storage.can_reuse(small), storage.can_reuse(large)) == (False, True)


@pytest.mark.s3
def test_s3_reuse_is_refused_after_the_object_was_replaced(s3: Backend) -> None:
    """An object rewritten since its token was issued (same size) is not reused."""
    with opened(s3.url) as storage:
        _, token = commit(storage, 1, memory_bytes(6 * 1024, size=1000))
        old = s3.read_raw("ep_000001/memory_1.jsonl")
        s3.write_raw("ep_000001/memory_1.jsonl", old[:-2] + b"!\n")
        assert storage.can_reuse(token) is False


@pytest.mark.s3
def test_s3_reused_prefix_is_copied_server_side(s3: Backend) -> None:
    """Only the appended bytes are uploaded; the prefix is copied; the file is exact."""
    first = memory_bytes(6 * 1024, size=1000)
    second = first + memory_bytes(50, start=6 * 1024)
    with opened(s3.url) as storage:
        _, token = commit(storage, 1, first)
        assert storage.can_reuse(token)
        with recorded_s3_calls(storage) as calls:
            path, _ = commit(storage, 2, second, reuse=token)
    mem_calls = [(m, n) for m, key, n in calls if key.endswith("/ep_000002/memory_2.jsonl")]
    assert [m for m, _ in mem_calls].count("upload_part_copy") == 1
    assert sum(n for _, n in mem_calls) == len(second) - len(first)
    assert s3.read_raw("ep_000002/memory_2.jsonl") == second
    assert verify_checkpoint(path).files["memory_2.jsonl"].bytes == len(second)


# -- pointer and deletion ------------------------------------------------------------


def test_replace_pointer_moves_latest(remote: Backend) -> None:
    """replace_pointer writes latest.json, which resolve follows."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3))
        commit(storage, 2, memory_bytes(4))
        storage.replace_pointer("ep_000001", dump_json({"checkpoint": "ep_000001",
                                                         "episode_index": 1}))
    assert json.loads(remote.read_raw("latest.json"))["checkpoint"] == "ep_000001"
    assert str(resolve_checkpoint(remote.url)) == f"{remote.url}/ep_000001"


def test_delete_removes_the_whole_checkpoint(remote: Backend) -> None:
    """delete() leaves no object of the checkpoint."""
    with opened(remote.url) as storage:
        commit(storage, 1, memory_bytes(3))
        storage.delete("ep_000001")
    assert not any(n.startswith("ep_000001") for n in remote.names())


def test_delete_removes_the_marker_first(remote: Backend) -> None:
    """A deletion that dies after the marker leaves a prefix readers do not list."""
    with opened(remote.url, crash_at="marker_deleted") as storage:
        commit(storage, 1, memory_bytes(3))
        commit(storage, 2, memory_bytes(4))
        with pytest.raises(_Crash):
            storage.delete("ep_000001")
    assert "ep_000001/memory_1.jsonl" in remote.names()
    assert checkpoint_names(remote.url) == ["ep_000002"]
