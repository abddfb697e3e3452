"""Written only if changed: unchanged state keys, extra files and idle logs are linked
(hard links locally, server-side copies on S3), and what sharing a file means when it
is damaged."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from _runtime_util import cli
from _s3_util import make_backend, s3_endpoint  # noqa: F401
from ckptwriter import (
    AgentState,
    CheckpointFallbackWarning,
    CheckpointWriter,
    MemoryLog,
    Observation,
    Snapshot,
    load_checkpoint,
)
from ckptwriter.process_executor import ProcessExecutor
from ckptwriter.storage import local_reuse
from ckptwriter.storage.remote import RemoteStorage

pytestmark = pytest.mark.anyio


def _ino(ckdir: Path, ep: int, name: str) -> int:
    return (ckdir / f"ep_{ep:06d}" / name).stat().st_ino


def _snap(ep: int, mem: MemoryLog, state: AgentState, **kw: Any) -> Snapshot:
    return Snapshot(ep, ep, "A", mem, state=state, **kw)


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_unchanged_key_is_one_inode_and_survives_retention(
        executor: str, tmp_path: Path) -> None:
    mem, chat, state = MemoryLog(), MemoryLog(), AgentState()
    state["big"] = {"table": list(range(2000))}
    state["small"] = 1
    results = []
    async with CheckpointWriter(tmp_path, keep_last=2, executor=executor, fsync=False) as w:
        for ep in range(1, 4):
            mem.append(Observation(content=f"o{ep}"))
            if ep != 2:
                chat.append(Observation(content=f"c{ep}"))
            state["small"] = ep
            results.append(await (await w.submit(_snap(
                ep, mem, state, logs={"chat": chat}, extra_files={"cfg.json": {"a": 1}}))).wait())
    big = "state.big.json"
    # ep_000001 was deleted by retention; its inode lives on in ep_000002 and ep_000003.
    assert sorted(os.listdir(tmp_path / "ep_000003"))  # exists
    assert not (tmp_path / "ep_000001").exists()
    assert _ino(tmp_path, 2, big) == _ino(tmp_path, 3, big)
    assert (tmp_path / "ep_000003" / big).stat().st_nlink == 2
    assert _ino(tmp_path, 2, "cfg.json") == _ino(tmp_path, 3, "cfg.json")
    assert _ino(tmp_path, 2, "state.small.json") != _ino(tmp_path, 3, "state.small.json")
    assert (tmp_path / "ep_000003" / "state.small.json").read_bytes() == b"3"
    # chat had nothing appended at ep 2: linked from ep 1; appended at ep 3: a new file.
    assert _ino(tmp_path, 2, "log.chat.jsonl") != _ino(tmp_path, 3, "log.chat.jsonl")
    ck = load_checkpoint(tmp_path)
    assert ck.state["big"] == {"table": list(range(2000))}
    assert ck.state["small"] == 3
    # What was really written: the big key once, then never again.
    size_big = len(state.encoded("big"))
    assert results[0].bytes_written > size_big > results[1].bytes_written
    # big, cfg.json, the idle chat log, and agent.json (no log grew: the same bytes)
    assert results[1].files_linked == 4
    assert results[1].bytes_reused >= size_big
    assert results[2].files_linked == 2  # big, cfg.json (chat grew, so agent.json too)


async def test_bytes_written_counts_only_what_was_written(tmp_path: Path) -> None:
    mem, state = MemoryLog(), AgentState()
    state["k"] = "x" * 5000
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        mem.append(Observation(content="first"))
        await (await w.submit(_snap(1, mem, state))).wait()
        before = mem.nbytes
        mem.append(Observation(content="second"))
        state["j"] = [1, 2]
        r = await (await w.submit(_snap(2, mem, state))).wait()
        s = w.stats
    ep2 = tmp_path / "ep_000002"
    written = (mem.nbytes - before) + len(b"[1,2]") + (ep2 / "agent.json").stat().st_size \
        + (ep2 / "runtime.json").stat().st_size
    assert r.bytes_written == written
    assert r.bytes_reused == before + 5002
    assert r.files_linked == 1
    assert s.bytes_reused == r.bytes_reused
    assert s.files_linked == 1


async def test_process_sends_only_changed_state_and_resends_when_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, bool]] = []
    real = ProcessExecutor._request

    def spy(self: ProcessExecutor, snap: Any, full: bool) -> Any:
        req, views = real(self, snap, full)
        sent.append({k: r.sent for k, r in req.state.items()})
        return req, views

    monkeypatch.setattr(ProcessExecutor, "_request", spy)
    mem, state = MemoryLog(), AgentState()
    state["a"], state["b"] = {"v": 1}, b"\x01" * 3000
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        for ep in (1, 2):
            state["a"] = {"v": ep}
            await (await w.submit(_snap(ep, mem, state))).wait()
        # Edit ep 2's file of b in place: the writer process may no longer link it, so it
        # asks for everything (resend_full) and writes b from the bytes sent.
        target = tmp_path / "ep_000002" / "state.b.bin"
        target.write_bytes(b"\x02" * 3000)
        state["a"] = {"v": 3}
        r = await (await w.submit(_snap(3, mem, state))).wait()
    assert sent == [{"a": True, "b": True}, {"a": True, "b": False},
                    {"a": True, "b": False}, {"a": True, "b": True}]
    assert r.files_linked == 2  # the (empty) memory and agent.json; b is written again
    assert _ino(tmp_path, 2, "state.b.bin") != _ino(tmp_path, 3, "state.b.bin")
    assert (tmp_path / "ep_000003" / "state.b.bin").read_bytes() == b"\x01" * 3000
    assert load_checkpoint(tmp_path / "ep_000003").state["b"] == b"\x01" * 3000


async def test_link_refused_falls_back_to_a_copy(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(*a: Any, **k: Any) -> None:
        raise OSError(errno.EMLINK, "Too many links")

    mem, state = MemoryLog(), AgentState({"k": [1, 2, 3]})
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, mem, state))).wait()
        monkeypatch.setattr(local_reuse.os, "link", no_link)
        r = await (await w.submit(_snap(2, mem, state))).wait()
    assert _ino(tmp_path, 1, "state.k.json") != _ino(tmp_path, 2, "state.k.json")
    assert (tmp_path / "ep_000002" / "state.k.json").read_bytes() == b"[1,2,3]"
    # The memory, agent.json and k: reused (copied by the kernel), nothing re-encoded.
    assert r.files_linked == 3
    assert load_checkpoint(tmp_path).state["k"] == [1, 2, 3]


async def test_a_link_to_another_file_is_never_kept(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def swapped(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int,
                follow_symlinks: bool) -> None:
        # As if the source name were swapped for another file between check and link.
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dst_dir_fd)
        os.write(fd, b"planted")
        os.close(fd)

    mem, state = MemoryLog(), AgentState({"k": "v"})
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        await (await w.submit(_snap(1, mem, state))).wait()
        monkeypatch.setattr(local_reuse.os, "link", swapped)
        await (await w.submit(_snap(2, mem, state))).wait()
    assert (tmp_path / "ep_000002" / "state.k.json").read_bytes() == b'"v"'
    assert load_checkpoint(tmp_path).state["k"] == "v"


async def test_damaged_shared_file_breaks_each_holder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mem, state = MemoryLog(), AgentState()
    async with CheckpointWriter(tmp_path, executor="thread", fsync=False) as w:
        for ep in range(1, 5):
            mem.append(Observation(content=f"o{ep}"))
            if ep <= 2:
                state["k"] = {"version": ep}  # ep 2, 3 and 4 share one file
            await (await w.submit(_snap(ep, mem, state))).wait()
    shared = tmp_path / "ep_000004" / "state.k.json"
    assert shared.stat().st_nlink == 3
    fd = os.open(shared, os.O_WRONLY)  # damaged in place: every name of it sees it
    os.pwrite(fd, b"X", 0)
    os.close(fd)
    capsys.readouterr()
    assert cli(["verify", str(tmp_path)], tmp_path) != 0
    out = capsys.readouterr().out
    for ep, others in ((2, "ep_000003, ep_000004"), (3, "ep_000002, ep_000004"),
                       (4, "ep_000002, ep_000003")):
        assert (f"BROKEN  {tmp_path / f'ep_{ep:06d}'}: state.k.json: sha256 does not match "
                f"runtime.json (shared with {others})") in out
    assert f"OK      {tmp_path / 'ep_000001'}" in out
    assert "1/4 checkpoints OK" in out
    # Resume from latest falls back past every checkpoint holding it.
    with pytest.warns(CheckpointFallbackWarning, match="ep_000001"):
        ck = load_checkpoint(tmp_path)
    assert ck.runtime.episode_index == 1
    assert ck.state["k"] == {"version": 1}


@pytest.mark.s3
async def test_s3_unchanged_key_is_copied_server_side(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = make_backend("s3", tmp_path, request).url
    storage = RemoteStorage(url)
    calls: list[tuple[str, str, int]] = []
    fs = storage.store.fs
    real = fs._call_s3

    async def spy(method: str, *a: Any, **kw: Any) -> Any:
        body = kw.get("Body")
        calls.append((method, str(kw.get("Key", "")), len(body) if body is not None else 0))
        return await real(method, *a, **kw)

    fs._call_s3 = spy
    mem, state = MemoryLog(), AgentState()
    state["big"] = "z" * 20000
    try:
        async with CheckpointWriter(storage=storage, keep_last=2, executor="thread") as w:
            for ep in (1, 2, 3):
                state["step"] = ep
                mem.append(Observation(content=f"o{ep}"))
                r = await (await w.submit(_snap(ep, mem, state))).wait()
                assert r.bytes_written < 20000 or ep == 1
    finally:
        fs._call_s3 = real
    big_puts = [c for c in calls if c[1].endswith("state.big.json")
                and c[0] in ("put_object", "upload_part")]
    copies = [c for c in calls if c[1].endswith("state.big.json") and c[0] == "copy_object"]
    assert [c[1].rsplit("/", 2)[1] for c in big_puts] == ["ep_000001"]
    assert [c[1].rsplit("/", 2)[1] for c in copies] == ["ep_000002", "ep_000003"]
    ck = load_checkpoint(url)
    assert ck.state["big"] == "z" * 20000
    assert ck.state["step"] == 3
