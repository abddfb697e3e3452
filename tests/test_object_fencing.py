"""Object storage under real faults: re-commits killed or cut off midway, lost replies to
lock renewals, a wall-clock jump, a writer frozen past its lease (fencing), and stale
multipart uploads.

Everything runs against moto's S3 server on 127.0.0.1 (see _s3_util); a TCP proxy
(_tcp_proxy) loses replies and cuts the network; kills and stops are real signals to
real child processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _s3_util import BUCKET, Backend, make_backend, s3_endpoint  # noqa: F401 -- fixture
from _tcp_proxy import FlakyProxy
from ckptwriter import (
    DirectoryLockedError,
    MemoryLog,
    StorageError,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from ckptwriter.commit import CommitPipeline
from ckptwriter.retention import KeepAll, KeepLastN
from ckptwriter.storage.remote import RemoteStorage
from conftest import add_episode, snapshot

pytestmark = pytest.mark.s3

# Wide: the machine may be busy; a healthy run takes a fraction of these.
CHILD_TIMEOUT = 120.0
WAIT_SECONDS = 60.0


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh checkpoints prefix on S3."""
    return make_backend("s3", tmp_path, request)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FlakyProxy]:  # noqa: F811 -- the fixture
    """A proxy in front of the moto server, closed after the test."""
    p = FlakyProxy(s3_endpoint)
    yield p
    p.close()


def through(proxy: FlakyProxy, **options: Any) -> dict[str, Any]:
    """Storage options for an s3fs client that talks to the store through ``proxy``."""
    return {"skip_instance_cache": True, "client_kwargs": {"endpoint_url": proxy.url},
            **options}


def write_episodes(url: str, episodes: range) -> MemoryLog:
    """Commit ``episodes`` in-process (keep all); the memory log as last committed."""
    memory = MemoryLog()
    pipeline = CommitPipeline(RemoteStorage(url), KeepAll())
    pipeline.open()
    try:
        for ep in episodes:
            add_episode(memory, ep)
            pipeline.persist(snapshot(memory, ep).capture())
    finally:
        pipeline.close()
    return memory


def latest_name(s3: Backend) -> str:
    """The checkpoint latest.json names."""
    return str(json.loads(s3.read_raw("latest.json"))["checkpoint"])


# -- re-committing an existing episode (issue 10, item 2) -----------------------------

_RECOMMIT_CHILD = textwrap.dedent("""
    import os, sys
    from ckptwriter import Snapshot, load_checkpoint
    from ckptwriter.commit import CommitPipeline
    from ckptwriter.retention import KeepLastN
    from ckptwriter.storage.remote import RemoteStorage

    url, step, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class DiesAtStep(RemoteStorage):
        def _step(self, name):
            if name == step:
                os._exit(3)

    # A resume in place with checkpoint_on_start: the episode resumed from, again.
    loaded = load_checkpoint(url)
    pipeline = CommitPipeline(DiesAtStep(url), KeepLastN(keep))
    pipeline.open()
    pipeline.persist(Snapshot(
        episode_index=loaded.runtime.episode_index, train_steps_total=99,
        agent_type=loaded.agent.agent_type, memory=loaded.memory,
        agent_config=loaded.agent.config, resumed_from=str(loaded.path),
    ).capture())
    os._exit(0)
""")


@pytest.mark.parametrize("keep", [pytest.param(1, id="keep1"), pytest.param(3, id="keep3")])
@pytest.mark.parametrize("step", [pytest.param(s, id=s) for s in RemoteStorage.STEPS])
def test_recommit_killed_at_any_step_leaves_the_checkpoint(
    s3: Backend, step: str, keep: int
) -> None:
    """A re-commit killed (os._exit) after any step: latest loads the episode, no fallback."""
    memory = write_episodes(s3.url, range(1, 6))
    child = subprocess.run([sys.executable, "-c", _RECOMMIT_CHILD, s3.url, step, str(keep)],
                           timeout=CHILD_TIMEOUT, capture_output=True, text=True)
    assert child.returncode == 3, child.stderr
    loaded = load_checkpoint(f"{s3.url}/latest")  # a fallback warning would be an error
    assert (loaded.runtime.episode_index, loaded.memory.to_jsonl()) == (5, memory.to_jsonl())
    assert latest_name(s3) == "ep_000005"


@pytest.mark.parametrize("keep", [pytest.param(1, id="keep1"), pytest.param(3, id="keep3")])
@pytest.mark.parametrize("step", [pytest.param(s, id=s) for s in RemoteStorage.STEPS])
def test_recommit_cut_off_at_any_step_leaves_the_checkpoint(
    s3: Backend, proxy: FlakyProxy, step: str, keep: int
) -> None:
    """The network goes down after each step of a re-commit: latest still loads."""
    memory = write_episodes(s3.url, range(1, 6))

    cuts: list[str] = []

    class CutAtStep(RemoteStorage):
        def _step(self, name: str) -> None:
            if name == step and not cuts:
                cuts.append(name)
                proxy.cut()

    storage = CutAtStep(s3.url, **through(proxy,
                                          config_kwargs={"retries": {"max_attempts": 1}}))
    pipeline = CommitPipeline(storage, KeepLastN(keep))
    pipeline.open()
    try:
        pipeline.persist(snapshot(memory, 5, val_score=0.5).capture())
    except StorageError:
        pass  # the cut reached a request; what matters is what readers find
    finally:
        pipeline.close()
    assert cuts == [step]
    loaded = load_checkpoint(f"{s3.url}/latest")
    assert (loaded.runtime.episode_index, loaded.memory.to_jsonl()) == (5, memory.to_jsonl())


def test_recommit_with_other_content_is_refused_through_the_pipeline(s3: Backend) -> None:
    """Episode 5 again with one more entry: refused, naming the fix; ep 5 stays."""
    memory = write_episodes(s3.url, range(1, 6))
    before = memory.to_jsonl()
    add_episode(memory, 6)
    pipeline = CommitPipeline(RemoteStorage(s3.url), KeepLastN(1))
    pipeline.open()
    try:
        with pytest.raises(StorageError, match=r"^ep_000005 already exists in .* with other "
                                                r"content \(memory_5.jsonl: "):
            pipeline.persist(snapshot(memory, 5).capture())
    finally:
        pipeline.close()
    assert load_checkpoint(f"{s3.url}/latest").memory.to_jsonl() == before


# -- lock renewal: lost replies and the wall clock (item 6) ---------------------------


def test_lost_reply_to_a_lock_renewal_is_not_a_takeover(s3: Backend, proxy: FlakyProxy) -> None:
    """The renewal PUT is applied, its reply lost, the retry gets 412: checkpointing goes on."""
    storage = RemoteStorage(s3.url, lock_ttl=600, **through(proxy))
    pipeline = CommitPipeline(storage, KeepAll())
    pipeline.open()
    memory = MemoryLog()
    try:
        add_episode(memory, 1)
        pipeline.persist(snapshot(memory, 1).capture())
        proxy.lose_reply(f"PUT /{s3.root}/.lock".encode())
        for ep in (2, 3):
            add_episode(memory, ep)
            pipeline.persist(snapshot(memory, ep).capture())
        assert proxy.lost.is_set(), "no reply was lost: the test proved nothing"
    finally:
        pipeline.close()
    assert latest_name(s3) == "ep_000003"
    assert ".lock" not in s3.names()


def test_lost_reply_to_a_pointer_update_is_not_a_conflict(s3: Backend, proxy: FlakyProxy) -> None:
    """latest.json's PUT applied, reply lost, retried into a 412: the commit succeeds."""
    storage = RemoteStorage(s3.url, **through(proxy))
    pipeline = CommitPipeline(storage, KeepAll())
    pipeline.open()
    memory = MemoryLog()
    try:
        add_episode(memory, 1)
        pipeline.persist(snapshot(memory, 1).capture())
        proxy.lose_reply(f"PUT /{s3.root}/latest.json".encode())
        add_episode(memory, 2)
        pipeline.persist(snapshot(memory, 2).capture())
        assert proxy.lost.is_set(), "no reply was lost: the test proved nothing"
        add_episode(memory, 3)
        pipeline.persist(snapshot(memory, 3).capture())
    finally:
        pipeline.close()
    assert latest_name(s3) == "ep_000003"


def test_wall_clock_jump_does_not_end_the_lease(
    s3: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """time.time() jumps 90 s ahead (TTL 60 s) mid-run: the next checkpoints still commit."""
    pipeline = CommitPipeline(RemoteStorage(s3.url, lock_ttl=60), KeepAll())
    pipeline.open()
    memory = MemoryLog()
    try:
        add_episode(memory, 1)
        pipeline.persist(snapshot(memory, 1).capture())
        jumped = time.time() + 90
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 90)
        assert time.time() >= jumped
        for ep in (2, 3):
            add_episode(memory, ep)
            pipeline.persist(snapshot(memory, ep).capture())
    finally:
        pipeline.close()
    assert latest_name(s3) == "ep_000003"


# -- fencing a writer that lost its lease (item 7) ------------------------------------

_FROZEN_CHILD = textwrap.dedent("""
    import os, signal, sys
    from ckptwriter import MemoryLog, Observation, Snapshot
    from ckptwriter.commit import CommitPipeline
    from ckptwriter.retention import KeepLastN
    from ckptwriter.storage.remote import RemoteStorage

    class FreezesAfterMarker(RemoteStorage):
        freeze = False
        def _step(self, name):
            if name == "marker_written" and self.freeze:
                print("frozen", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)

    storage = FreezesAfterMarker(sys.argv[1], lock_ttl=3.0)
    pipeline = CommitPipeline(storage, KeepLastN(2))
    pipeline.open()
    memory = MemoryLog()

    def attempt(what, fn):
        try:
            fn()
            print("succeeded", what, flush=True)
        except Exception as exc:
            print("failed", what, type(exc).__name__, exc, flush=True)

    for ep in (1, 2, 3):
        memory.append(Observation(content=f"writer A, episode {ep}"))
        storage.freeze = ep == 3
        snap = Snapshot(ep, ep, "A", memory).capture()
        attempt(f"commit {ep}", lambda: pipeline.persist(snap))
    memory.append(Observation(content="writer A, episode 4"))
    snap = Snapshot(4, 4, "A", memory).capture()
    attempt("commit 4", lambda: pipeline.persist(snap))
    attempt("pointer", lambda: storage.replace_pointer("ep_000003", b'{"checkpoint": "ep_000003"}'))
    attempt("delete", lambda: storage.delete("ep_000010"))
    storage.close()
""")


def _start_frozen(child: str, url: str) -> subprocess.Popen[str]:
    """Start writer A (``child``) and return once it has stopped itself (SIGSTOP)."""
    a = subprocess.Popen([sys.executable, "-c", child, url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert a.stdout is not None
        lines = []
        while (line := a.stdout.readline()) and line != "frozen\n":
            lines.append(line)
        assert line == "frozen\n", (lines, a.stderr.read() if a.stderr else "")
        _wait_stopped(a.pid)
    except BaseException:
        a.kill()
        a.wait()
        raise
    return a


def _open_once_expired(pipeline: CommitPipeline, whose: str = "A's") -> None:
    """Open ``pipeline`` as soon as the lock another writer left has expired."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            pipeline.open()
            return
        except DirectoryLockedError:
            assert time.monotonic() < deadline, f"{whose} lock never expired"
            time.sleep(0.1)


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, "the child never stopped"
        time.sleep(0.01)


def test_writer_frozen_past_its_lease_cannot_change_anything(s3: Backend) -> None:
    """A frozen (SIGSTOP) past its lease and replaced by B fails every write once continued."""
    a = _start_frozen(_FROZEN_CHILD, s3.url)
    try:
        b = CommitPipeline(RemoteStorage(s3.url), KeepAll())
        _open_once_expired(b)
        memory = MemoryLog()
        try:
            for ep in (10, 11):
                add_episode(memory, ep)
                b.persist(snapshot(memory, ep).capture())
            os.kill(a.pid, signal.SIGCONT)
            out, err = a.communicate(timeout=CHILD_TIMEOUT)
        finally:
            b.close()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, err
    after = out.splitlines()
    assert [line.split(" ", 2)[:2] for line in after] == [
        ["failed", "commit"], ["failed", "commit"], ["failed", "pointer"], ["failed", "delete"]
    ], out
    assert all("DirectoryLockedError This writer lost the lock on " in line for line in after)
    assert latest_name(s3) == "ep_000011"
    assert {"ep_000010", "ep_000011"} <= {i.name for i in list_checkpoints(s3.url) if i.complete}
    assert verify_checkpoint(f"{s3.url}/ep_000010").episode_index == 10
    assert "ep_000004/memory_4.jsonl" not in s3.names()


_FROZEN_MID_BATCH_CHILD = textwrap.dedent("""
    import os, signal, sys
    from ckptwriter import MemoryLog, Observation, Snapshot
    from ckptwriter.commit import CommitPipeline
    from ckptwriter.retention import KeepAll
    from ckptwriter.storage.remote import RemoteStorage
    from ckptwriter.storage.s3 import S3ObjectStore

    storage = RemoteStorage(sys.argv[1], lock_ttl=3.0)
    orig = S3ObjectStore._aput_one

    async def _aput_one(self, item, sem, call):
        # The worst moment: this upload's lease check has passed and the process stops
        # before its request leaves (a GC pause, a VM suspend, SIGSTOP).
        if not item.path.endswith("/ep_000004/blob3.bin"):
            return await orig(self, item, sem, call)

        async def frozen(op, **kw):
            storage._lock.check()
            print("frozen", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            return await self.fs._call_s3(op, **kw)

        return await orig(self, item, sem, frozen)

    S3ObjectStore._aput_one = _aput_one
    pipeline = CommitPipeline(storage, KeepAll())
    pipeline.open()
    memory = MemoryLog()
    for ep in (1, 2, 3, 4):
        memory.append(Observation(content=f"writer A, episode {ep}"))
        extra = {f"blob{i}.bin": f"A {ep} {i} ".encode() * 1000 for i in range(6)}
        try:
            # Every file new (no server-side copy: moto ignores If-None-Match on
            # CopyObject, which S3 honours).
            pipeline.persist(Snapshot(ep, ep, "A", memory, extra_files=extra,
                                      agent_config={"ep": ep}).capture())
            print("succeeded", ep, flush=True)
        except Exception as exc:
            print("failed", ep, type(exc).__name__, exc, flush=True)
    storage.close()
""")


def test_frozen_writers_request_already_past_its_lease_check_cannot_overwrite(
    s3: Backend,
) -> None:
    """A stopped after its lease check, before its upload left; B takes over and commits
    the same episode with other files; A's upload, once continued, is refused (412)."""
    a = _start_frozen(_FROZEN_MID_BATCH_CHILD, s3.url)
    try:
        b = CommitPipeline(RemoteStorage(s3.url), KeepAll())
        _open_once_expired(b)
        try:
            resumed = load_checkpoint(s3.url)
            memory = resumed.memory
            add_episode(memory, 4)
            extra = {f"blob{i}.bin": f"B 4 {i} ".encode() * 900 for i in range(6)}
            b.persist(snapshot(memory, 4, extra_files=extra).capture())
            os.kill(a.pid, signal.SIGCONT)
            out, err = a.communicate(timeout=CHILD_TIMEOUT)
        finally:
            b.close()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, err
    assert out.splitlines()[-1].startswith("failed 4 DirectoryLockedError"), out
    assert verify_checkpoint(f"{s3.url}/ep_000004").episode_index == 4
    assert s3.read_raw("ep_000004/blob3.bin") == b"B 4 3 " * 900
    assert load_checkpoint(s3.url).agent.agent_type == "HistoryAgent"


def test_an_object_that_lands_under_a_new_name_after_open_is_replaced(s3: Backend) -> None:
    """A late upload of a writer that lost the lock lands under the name B is about to
    commit, after B's open cleaned it: B's exclusive upload meets it, removes it under
    its confirmed lock and uploads its own; the checkpoint is B's, whole."""
    b = CommitPipeline(RemoteStorage(s3.url), KeepAll())
    b.open()
    try:
        memory = MemoryLog()
        add_episode(memory, 1)
        s3.write_raw("ep_000001/agent.json", b'{"late": "from a writer that lost the lock"}')
        s3.write_raw("ep_000001/memory_1.jsonl", b"not these bytes\n")
        b.persist(snapshot(memory, 1).capture())
    finally:
        b.close()
    assert verify_checkpoint(f"{s3.url}/ep_000001").episode_index == 1
    assert b"late" not in s3.read_raw("ep_000001/agent.json")


_DIES_BEFORE_LATEST_CHILD = textwrap.dedent("""
    import os, sys
    from ckptwriter import MemoryLog, Observation, Snapshot
    from ckptwriter.commit import CommitPipeline
    from ckptwriter.retention import KeepAll
    from ckptwriter.storage.remote import RemoteStorage

    class DiesAfterMarker(RemoteStorage):
        episode = 0
        def begin(self, name):
            self.episode = int(name[3:])
            return super().begin(name)
        def _step(self, name):
            if name == "marker_written" and self.episode == 3:
                os._exit(3)

    pipeline = CommitPipeline(DiesAfterMarker(sys.argv[1], lock_ttl=2.0), KeepAll())
    pipeline.open()
    memory = MemoryLog()
    for ep in (1, 2, 3):
        memory.append(Observation(content=f"episode {ep}"))
        pipeline.persist(Snapshot(ep, ep, "A", memory).capture())
""")


def test_a_writer_opening_after_a_kill_moves_a_lagging_latest_json_on(s3: Backend) -> None:
    """Killed after ep 3's marker, before latest.json moved: the next writer's open
    points latest.json at ep 3 before it commits anything."""
    p = subprocess.run([sys.executable, "-c", _DIES_BEFORE_LATEST_CHILD, s3.url],
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    assert p.returncode == 3, p.stderr
    assert latest_name(s3) == "ep_000002"
    b = CommitPipeline(RemoteStorage(s3.url), KeepAll())
    _open_once_expired(b, "the dead writer's")
    b.close()
    assert latest_name(s3) == "ep_000003"
    assert load_checkpoint(s3.url).runtime.episode_index == 3


# -- stale multipart uploads (item 8) -------------------------------------------------


def test_open_aborts_stale_multipart_uploads_under_its_prefix(s3: Backend) -> None:
    """An upload a killed writer left is aborted at the next open; another prefix's stays."""
    fs = s3.fs
    key = s3.root.partition("/")[2]
    mine = fs.call_s3("create_multipart_upload", Bucket=BUCKET,
                      Key=f"{key}/ep_000001/memory_1.jsonl")
    other_key = f"{key}-other/ep_000001/memory_1.jsonl"
    other = fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=other_key)
    # Another run's directory nested below this one: its own lock, its uploads live.
    nested_key = f"{key}/exp2/ep_000007/memory_7.jsonl"
    nested = fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=nested_key)

    def uploads(prefix: str) -> list[str]:
        page = fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=prefix)
        return [u["UploadId"] for u in page.get("Uploads", [])]

    assert sorted(uploads(f"{key}/")) == sorted([mine["UploadId"], nested["UploadId"]])
    storage = RemoteStorage(s3.url)
    CommitPipeline(storage, KeepAll()).open()
    storage.close()
    assert storage.aborted_uploads == 1
    assert uploads(f"{key}/") == [nested["UploadId"]]
    assert uploads(f"{key}-other/") == [other["UploadId"]]
    fs.call_s3("abort_multipart_upload", Bucket=BUCKET, Key=nested_key,
               UploadId=nested["UploadId"])
    fs.call_s3("abort_multipart_upload", Bucket=BUCKET, Key=other_key, UploadId=other["UploadId"])
