"""The writer process reading a large hand-over from the training process's memory.

Where the training process's ``/proc/self/mem`` can be handed to the writer process and
read (the open's probe says so), a delta larger than the pipe is never copied by the
loop: the frame says where its bytes are, and the writer process reads, writes and
hashes them a piece at a time. Elsewhere the memfd hand-over
(``test_process_handover.py``) is used, and so it is when the probe fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from _s3_util import BUCKET, s3_endpoint  # noqa: F401
from ckptwriter import (
    AgentState,
    CheckpointWriter,
    MemoryLog,
    Observation,
    load_checkpoint,
    memory_pull,
    verify_checkpoint,
)
from ckptwriter import process_executor as pe
from ckptwriter.memory_pieces import Pulled
from ckptwriter.options import WriterOptions
from ckptwriter.storage.posix_io import DIRECT_MIN_BYTES
from conftest import (
    add_episode,
    big_memory,
    files_match_their_digests,
    snapshot,
)


def _own_memory_readable() -> bool:
    fd = memory_pull.open_own_memory()
    if fd is None:
        return False
    os.close(fd)
    return True


pytestmark = pytest.mark.skipif(
    not _own_memory_readable(), reason="no /proc/self/mem here (not Linux, or a sandbox): "
    "the memfd hand-over is used, and tested in test_process_handover.py")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def memfds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the memfd hand-overs the loop makes."""
    made: list[int] = []
    real = pe._new_delta_fd

    def counting() -> int:
        made.append(1)
        return real()

    monkeypatch.setattr(pe, "_new_delta_fd", counting)
    return made


@pytest.mark.anyio
async def test_large_hand_over_is_read_from_the_loop_and_byte_identical(
    tmp_path: Path, memfds: list[int]
) -> None:
    """Memory, a log and state values over many pieces, full then incremental: every
    file equals its bytes and the sha256 runtime.json gives, and the loop made no memfd."""
    mem, tool_log = big_memory(9), big_memory(5, "t")
    state = AgentState()
    state["blob"] = os.urandom(3 * 1024 * 1024 + 7)
    state["small"] = {"a": 1}
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        r1 = await (await w.submit(snapshot(mem, 1, logs={"tools": tool_log},
                                            state=state))).wait()
        for ep in range(2, 400):
            add_episode(mem, ep)
        tool_log.append(Observation(content="x" * 3_000_000))
        state["blob"] = os.urandom(2 * 1024 * 1024)
        r2 = await (await w.submit(snapshot(mem, 2, logs={"tools": tool_log},
                                            state=state))).wait()
    assert (r1.incremental, r2.incremental) == (False, True)
    assert memfds == []
    for r in (r1, r2):
        files_match_their_digests(Path(r.path))
        verify_checkpoint(r.path)
    ck = load_checkpoint(tmp_path / "latest")
    assert ck.memory.to_jsonl() == mem.to_jsonl()
    assert ck.logs["tools"].to_jsonl() == tool_log.to_jsonl()
    assert ck.state["blob"] == state["blob"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_large_full_write_past_the_page_cache_then_an_incremental_one(
    tmp_path: Path,
) -> None:
    """A full checkpoint of more than DIRECT_MIN_BYTES (written past the page cache,
    then read back into it: test_posix_io.py), and the incremental one that copies its
    prefix: both byte-exact, each file's sha256 as runtime.json lists it."""
    mem = big_memory((DIRECT_MIN_BYTES >> 20) + 8)
    async with CheckpointWriter(tmp_path, executor="process") as w:
        r1 = await (await w.submit(snapshot(mem, 1))).wait()
        add_episode(mem, 2)
        r2 = await (await w.submit(snapshot(mem, 2))).wait()
    assert (r1.incremental, r2.incremental) == (False, True)
    for r in (r1, r2):
        files_match_their_digests(Path(r.path))
    assert load_checkpoint(tmp_path / "latest").memory.to_jsonl() == mem.to_jsonl()


@pytest.mark.anyio
async def test_a_failed_probe_falls_back_to_the_memfd(
    tmp_path: Path, memfds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer process that cannot read the probe where the loop says it is (a sandbox
    without /proc, a security module) gets every large hand-over in a memfd instead."""
    real = memory_pull.addresses
    monkeypatch.setattr(pe.memory_pull, "addresses",
                        lambda views: [(4096, len(v)) for v in views] if len(views) == 1
                        else real(views))
    mem = big_memory(4)
    async with CheckpointWriter(tmp_path, executor="process", fsync=False) as w:
        r = await (await w.submit(snapshot(mem, 1))).wait()
    assert memfds == [1]
    files_match_their_digests(Path(r.path))
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()


@pytest.mark.anyio
async def test_cancelled_while_the_writer_process_reads_keeps_the_pipe_in_step(
    tmp_path: Path,
) -> None:
    """A persist cancelled while the writer process reads the loop's bytes still gets its
    reply (the bytes stay alive until then), and the next commit gets its own."""
    mem = big_memory(12)
    ex = pe.ProcessExecutor(str(tmp_path), WriterOptions(fsync=False))
    await ex.open()
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            first = await ex.persist(snapshot(mem, 1).capture())
        assert not scope.cancelled_caught  # its report came back, uncut
        add_episode(mem, 2)
        second = await ex.persist(snapshot(mem, 2).capture())
    finally:
        await ex.aclose()
    assert (first.episode_index, second.episode_index) == (1, 2)
    assert second.incremental
    files_match_their_digests(Path(second.path))
    assert load_checkpoint(tmp_path / "ep_000002").memory.to_jsonl() == mem.to_jsonl()


_PEER_READER = textwrap.dedent("""
    import hashlib, json, os, sys, threading
    from ckptwriter import memory_pull as mp
    from ckptwriter.memory_pieces import Pulled
    fd, ranges, what, how = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    peer = mp.PeerMemory(ranges, **({"fd": fd} if how == "fd" else {"parent": os.getppid()}))
    views = Pulled(peer, 3, peer.total - 3)
    out = {}
    if what == "write-and-hash":
        sha = hashlib.sha256()
        views.hash_along(sha)
        out["written"] = hashlib.sha256(b"".join(bytes(v) for v in views)).hexdigest()
        views.finish_hash()
        out["hashed"] = sha.hexdigest()
    elif what == "keep-every-view":
        kept = list(views)  # more views than buffers, all alive at once
        out["kept"] = hashlib.sha256(b"".join(kept)).hexdigest()
        out["second"] = hashlib.sha256(b"".join(views)).hexdigest()
    elif what == "abandon":
        sha = hashlib.sha256()
        views.hash_along(sha)
        for i, v in enumerate(views):
            if i == 2:
                break
        views.finish_hash()
        out["hashed"] = sha.hexdigest()
        out["last"] = hashlib.sha256(views[-1]).hexdigest()
        out["pieces"] = len(views)
    elif what == "gone":
        try:
            for v in views:
                pass
        except OSError as exc:
            out["error"] = str(exc)
    print(json.dumps(out))
""")


def _yama_lets_a_child_read_its_parent() -> bool:
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        return True  # no Yama
    return scope == "0" or (os.geteuid() == 0 and scope == "1")


_NO_PARENT_READ = pytest.mark.skipif(
    not _yama_lets_a_child_read_its_parent(),
    reason="Yama's ptrace_scope forbids a child to read its parent here (the writer "
    "process then reads through /proc/self/mem, the 'fd' cases)")


@pytest.fixture(params=["fd", pytest.param("parent", marks=_NO_PARENT_READ)])
def how(request: pytest.FixtureRequest) -> str:
    """Through the training process's /proc/self/mem, or process_vm_readv of the parent."""
    return str(request.param)


def _read_from_this_process(chunks: list[bytes], what: str, how: str) -> dict[str, object]:
    ranges = memory_pull.addresses(chunks)
    fd = memory_pull.open_own_memory()
    assert fd is not None
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PEER_READER, str(fd), json.dumps(ranges), what, how],
            capture_output=True, text=True, timeout=300, cwd=ROOT, pass_fds=(fd,),
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def _chunks() -> list[bytes]:
    # Many chunks of odd sizes: pieces span chunk boundaries.
    return [os.urandom(n) for n in (1, 5_000_001, 17, 3 * 1024 * 1024, 9_999_999, 2)] * 3


def test_pieces_are_written_and_hashed_from_one_read(how: str) -> None:
    chunks = _chunks()
    want = hashlib.sha256(b"".join(chunks)[3:]).hexdigest()
    out = _read_from_this_process(chunks, "write-and-hash", how)
    assert out == {"written": want, "hashed": want}


def test_a_reader_keeping_every_view_keeps_their_bytes(how: str) -> None:
    """More views alive at once than the buffers kept: none is overwritten."""
    chunks = _chunks()
    want = hashlib.sha256(b"".join(chunks)[3:]).hexdigest()
    out = _read_from_this_process(chunks, "keep-every-view", how)
    assert out == {"kept": want, "second": want}


def test_an_abandoned_iteration_still_gives_the_whole_digest(how: str) -> None:
    chunks = _chunks()
    data = b"".join(chunks)[3:]
    out = _read_from_this_process(chunks, "abandon", how)
    assert out["hashed"] == hashlib.sha256(data).hexdigest()
    last = (len(data) - 1) // memory_pull.PIECE_BYTES * memory_pull.PIECE_BYTES
    assert out["last"] == hashlib.sha256(data[last:]).hexdigest()
    assert out["pieces"] == -(-len(data) // memory_pull.PIECE_BYTES)


def test_a_gone_process_is_an_error_never_bytes() -> None:
    """Reading a process that has exited raises: nothing is written from it."""
    code = ("import os, sys; b = os.urandom(9 << 20); print(id(b)); sys.stdout.flush(); "
            "sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        addr = int(proc.stdout.readline())
        fd = os.open(f"/proc/{proc.pid}/mem", os.O_RDONLY)
        proc.stdin.close()
        proc.wait(timeout=60)
    try:
        peer = memory_pull.PeerMemory([(addr, 9 << 20)], fd=fd)
        with pytest.raises(OSError, match="exited"):
            peer.read(0, 10)
        with pytest.raises(OSError, match="exited"):
            for _ in Pulled(peer, 0, 9 << 20):
                pass
    finally:
        os.close(fd)


@_NO_PARENT_READ
def test_a_re_parented_reader_reads_nothing_more(tmp_path: Path) -> None:
    """Reading the parent directly: once the parent has exited (its pid free for another
    process), the next read is an error, never another process's bytes."""
    out = tmp_path / "out.json"
    grandchild = textwrap.dedent(f"""
        import json, os, sys, time
        from ckptwriter import memory_pull as mp
        parent, addr = os.getppid(), int(sys.argv[1])
        peer = mp.PeerMemory([(addr, 4096)], parent=parent)
        first = len(peer.read(0, 4096))
        print("read", flush=True)
        for _ in range(100_000):
            if os.getppid() != parent:
                break
            time.sleep(0.001)
        try:
            peer.read(0, 4096)
            result = "read again"
        except OSError as exc:
            result = str(exc)
        open({str(out)!r}, "w").write(json.dumps([first, result]))
    """)
    child = textwrap.dedent(f"""
        import os, subprocess, sys
        data = os.urandom(1 << 20)
        from ckptwriter import memory_pull as mp
        addr = mp.addresses([data])[0][0]
        g = subprocess.Popen([sys.executable, "-c", {grandchild!r}, str(addr)],
                             stdout=subprocess.PIPE, text=True)
        assert g.stdout.readline().strip() == "read"
        os._exit(0)  # the grandchild is re-parented
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=120, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    for _ in range(100_000):
        if out.exists() and out.read_text():
            break
        anyio.run(anyio.sleep, 0.001)
    first, result = json.loads(out.read_text())
    assert first == 4096
    assert "exited" in result


def test_a_parent_killed_mid_read_leaves_no_checkpoint_of_its_bytes(tmp_path: Path) -> None:
    """kill -9 of the training process while the writer process reads a large hand-over
    from it: what is committed verifies; what was not is not a checkpoint."""
    script = textwrap.dedent(f"""
        import anyio, sys
        from ckptwriter import CheckpointWriter, MemoryLog, Observation, Snapshot
        mem = MemoryLog()
        while mem.nbytes < 300 << 20:
            mem.append(Observation(content="x" * 60_000))
        async def main():
            async with CheckpointWriter({str(tmp_path)!r}, executor="process") as w:
                print("writing", flush=True)
                await (await w.submit(Snapshot(1, 1, "A", mem))).wait()
                print("done", flush=True)
        anyio.run(main)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        # Wait for the writer process's temp directory: it is reading and writing now.
        for _ in range(200_000):
            if any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()):
                break
            if proc.poll() is not None:
                break
            anyio.run(anyio.sleep, 0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # The writer process dies with it; a new writer opens the directory and cleans up.
    for _ in range(600):
        try:
            anyio.run(_open_and_close, tmp_path)
            break
        except Exception:  # the old writer process may still hold the lock a moment
            anyio.run(anyio.sleep, 0.1)
    # Usually nothing (the writer process dies with its parent); whatever was committed
    # holds exactly the loop's bytes (its sha256 was computed from the same reads).
    want = MemoryLog()
    while want.nbytes < 300 << 20:
        want.append(Observation(content="x" * 60_000))
    for ck in tmp_path.glob("ep_*"):
        verify_checkpoint(ck)
        assert load_checkpoint(ck).memory.to_jsonl() == want.to_jsonl()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


async def _open_and_close(path: Path) -> None:
    async with CheckpointWriter(path, executor="process"):
        pass


def test_a_read_refused_mid_run_asks_for_the_bytes_another_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that worked at open is refused later (the application made itself
    undumpable, a security module changed its mind): the writer process answers
    ``cannot_pull`` (no error, no commit), and the pipe stays in step for the same
    commit handed over another way."""
    import msgspec

    from ckptwriter import wire, writer_process

    def refuse(*args: object) -> None:
        raise memory_pull.PullRefused(1, "Operation not permitted")

    monkeypatch.setattr(memory_pull.PeerMemory, "read_into", refuse)
    mem = big_memory(3)
    ex = pe.ProcessExecutor(str(tmp_path), WriterOptions(fsync=False))
    req, views = ex._request(snapshot(mem, 1).capture(), full=True)
    size = sum(len(v) for v in views)
    pulled = wire.encode(msgspec.structs.replace(
        req, pull=memory_pull.addresses(views), delta_bytes=size))
    inline = wire.encode(msgspec.structs.replace(req, payload=size))
    opening = wire.encode(wire.OpenRequest(os.fsencode(str(tmp_path)),
                                           WriterOptions(fsync=False).to_wire(),
                                           os.getpid(), "token"))
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    with open(in_r, "rb") as inp, open(out_w, "wb") as out, \
            open(in_w, "wb") as send, open(out_r, "rb") as answers:
        import threading
        server = threading.Thread(target=writer_process.serve, args=(inp, out))
        server.start()

        def reply(kind: type) -> object:
            (n,) = wire.FRAME.unpack(answers.read(wire.FRAME.size))
            return wire.decode(wire.decoder(kind), answers.read(n))

        send.write(opening)
        send.flush()
        assert reply(wire.OpenReply).error is None  # type: ignore[attr-defined]
        send.write(pulled)
        send.flush()
        refused = reply(wire.CommitReply)
        assert refused == wire.CommitReply(cannot_pull=True)
        assert not list(tmp_path.glob("ep_*"))
        send.write(inline)
        for v in views:
            send.write(v)
        send.flush()
        done = reply(wire.CommitReply)
        assert done.report is not None  # type: ignore[attr-defined]
        send.close()
        server.join(timeout=120)
    files_match_their_digests(tmp_path / "ep_000001")
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()


@pytest.mark.anyio
@pytest.mark.usefixtures("s3_endpoint")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the reading is the same on trio
async def test_a_large_hand_over_to_object_storage_is_read_from_the_loop(
    memfds: list[int],
) -> None:
    """Uploads keep their parts (a join, multipart groups): the pieces they keep get
    buffers of their own, and every byte arrives as the loop had it."""
    import uuid

    url = f"s3://{BUCKET}/pull-{uuid.uuid4().hex}"
    mem, state = big_memory(24), AgentState()
    state["blob"] = os.urandom(5 * 1024 * 1024)
    async with CheckpointWriter(url, executor="process") as w:
        r1 = await (await w.submit(snapshot(mem, 1, state=state))).wait()
        for ep in range(2, 2000):
            add_episode(mem, ep)
        r2 = await (await w.submit(snapshot(mem, 2, state=state))).wait()
    assert (r1.incremental, memfds) == (False, [])
    assert r2.episode_index == 2
    verify_checkpoint(f"{url}/ep_000002")
    ck = load_checkpoint(url)
    assert ck.memory.to_jsonl() == mem.to_jsonl()
    assert ck.state["blob"] == state["blob"]


def test_a_writer_made_before_a_fork_reads_the_fork_that_opens_it(tmp_path: Path) -> None:
    """A writer built in one process and opened in a fork of it: its writer process
    reads the fork's memory (the handle and the probe are taken when it starts), not
    the same addresses in the process that forked."""
    script = textwrap.dedent(f"""
        import anyio, os, sys
        from ckptwriter import CheckpointWriter, MemoryLog, Observation, Snapshot
        w = CheckpointWriter({str(tmp_path / "ck")!r}, executor="process", fsync=False)
        pid = os.fork()
        if pid == 0:
            mem = MemoryLog()
            while mem.nbytes < 6 << 20:
                mem.append(Observation(content="child" * 4000))
            async def main():
                async with w:
                    await (await w.submit(Snapshot(1, 1, "A", mem))).wait()
            anyio.run(main)
            os._exit(0)
        junk = [os.urandom(1 << 20) for _ in range(64)]  # other bytes here meanwhile
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    want = MemoryLog()
    while want.nbytes < 6 << 20:
        want.append(Observation(content="child" * 4000))
    verify_checkpoint(tmp_path / "ck" / "ep_000001")
    assert load_checkpoint(tmp_path / "ck").memory.to_jsonl() == want.to_jsonl()


@pytest.mark.anyio
async def test_a_full_resend_that_is_refused_goes_through_the_memfd(
    tmp_path: Path, memfds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer process asks for the whole memory, and then cannot read it from the
    loop: both are honoured, once each, and the commit lands (no "no report")."""
    from ckptwriter import wire

    ex = pe.ProcessExecutor(str(tmp_path), WriterOptions(fsync=False))
    await ex.open()
    real = ex._exchange
    asked: list[tuple[bool, bool]] = []
    answers = [wire.CommitReply(resend_full=True), wire.CommitReply(cannot_pull=True)]

    async def exchange(snap: object, *, full: bool) -> wire.CommitReply:
        asked.append((full, ex._can_pull))
        if answers:
            return answers.pop(0)
        return await real(snap, full=full)  # type: ignore[arg-type]

    monkeypatch.setattr(ex, "_exchange", exchange)
    mem = big_memory(4)
    try:
        report = await ex.persist(snapshot(mem, 1).capture())
    finally:
        await ex.aclose()
    assert asked == [(False, True), (True, True), (True, False)]
    assert memfds == [1]
    assert report.episode_index == 1
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()


class _SlowSha:
    """sha256 slowed to ``rate`` bytes/s (a CPU without SHA-NI, a busy core)."""

    def __init__(self, rate: float) -> None:
        self.h, self.rate = hashlib.sha256(), rate

    def update(self, v: memoryview) -> None:
        self.h.update(v)
        anyio.run(anyio.sleep, len(v) / self.rate)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def test_a_hasher_slower_than_the_write_paces_it_in_the_buffers_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The write waits for a lagging hasher rather than every piece getting a buffer of
    its own: memory stays at the buffers kept, whatever the size of the hand-over."""
    data = [os.urandom(4 << 20) for _ in range(8)]  # 32 MiB, 16 pieces
    fd = memory_pull.open_own_memory()
    assert fd is not None
    own: list[int] = []
    real = memory_pull.PeerMemory.fresh

    def counting(self: memory_pull.PeerMemory, at: int, n: int) -> memoryview:
        own.append(n)
        return real(self, at, n)

    monkeypatch.setattr(memory_pull.PeerMemory, "fresh", counting)
    try:
        pulled = Pulled(memory_pull.PeerMemory(memory_pull.addresses(data), fd=fd), 0, 32 << 20)
        # 40 ms a piece: longer than the read-ahead waits before it gives up on a buffer.
        sha = _SlowSha(50e6)
        pulled.hash_along(sha)
        written = hashlib.sha256()
        batch: list[memoryview] = []
        for v in pulled:  # as the local backend writes: 8 MiB batches
            batch.append(v)
            if sum(map(len, batch)) >= 8 << 20:
                for b in batch:
                    written.update(b)
                batch = []
        for b in batch:
            written.update(b)
        del batch
        pulled.finish_hash()
    finally:
        os.close(fd)
    want = hashlib.sha256(b"".join(data)).hexdigest()
    assert (written.hexdigest(), sha.hexdigest()) == (want, want)
    assert own == []


@_NO_PARENT_READ
def test_a_direct_reader_never_reads_a_process_that_is_not_its_parent() -> None:
    """As if the parent had exited and its pid gone to another process: the direct read
    checks its parent afterwards and refuses the bytes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from ckptwriter import memory_pull as mp; "
         "b = os.urandom(4096); print(mp.addresses([b])[0][0], flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    with holder:
        assert holder.stdout is not None
        assert holder.stdin is not None
        addr = int(holder.stdout.readline())
        try:
            peer = memory_pull.PeerMemory([(addr, 4096)], parent=holder.pid)
            with pytest.raises(OSError, match="exited"):
                peer.read(0, 4096)
        finally:
            holder.stdin.close()
