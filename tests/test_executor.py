"""Where the writer's work runs: the writer process (default) and the worker thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from _fault_util import kill_wholly
from _s3_util import BACKENDS, make_backend, s3_endpoint  # noqa: F401 -- fixture
from ckptwriter import CheckpointWriter, ConfigError, MemoryLog, load_checkpoint
from ckptwriter.storage import LocalStorage
from conftest import add_episode, snapshot

pytestmark = pytest.mark.anyio


def _writer_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "ckptwriter.writer_process"],
                         capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _burn(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        pass


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        pytest.param({}, "process", id="local-default"),
        pytest.param({"executor": "thread"}, "thread", id="thread"),
    ],
)
async def test_executor_choice(tmp_path: Path, kwargs: dict[str, str], kind: str) -> None:
    """A local checkpoint_dir gets the writer process unless a thread is asked for."""
    mem = MemoryLog()
    add_episode(mem, 1)
    async with CheckpointWriter(tmp_path, **kwargs) as w:  # type: ignore[arg-type]
        assert w.executor == kind
        r = await (await w.submit(snapshot(mem, 1))).wait()
    assert r.entries_serialized == 3
    assert load_checkpoint(tmp_path).memory.to_jsonl() == mem.to_jsonl()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_auto_runs_the_writer_process_wherever_another_process_sees_the_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """Local disk and S3 get the writer process; memory:// (one per process) a thread."""
    backend = make_backend(kind, tmp_path, request)
    mem = MemoryLog()
    add_episode(mem, 1)
    async with CheckpointWriter(backend.url) as w:
        assert w.executor == ("thread" if kind == "memory" else "process")
        result = await (await w.submit(snapshot(mem, 1))).wait()
        assert [r.name for r in w.checkpoints] == ["ep_000001"]
    assert result.path == f"{backend.url}/ep_000001"
    assert load_checkpoint(backend.url).memory.to_jsonl() == mem.to_jsonl()


async def test_process_executor_refuses_an_in_process_store() -> None:
    """memory:// lives in this process: a writer process would write into its own copy."""
    with pytest.raises(ConfigError, match=r"^executor='process' cannot write to memory://x"):
        CheckpointWriter("memory://x/ck", executor="process")


async def test_storage_object_uses_a_thread(tmp_path: Path) -> None:
    """A storage object cannot cross into another process: it runs in a thread."""
    async with CheckpointWriter(storage=LocalStorage(tmp_path)) as w:
        assert w.executor == "thread"
    with pytest.raises(ConfigError, match=r"^executor='process' needs a local checkpoint_dir"):
        CheckpointWriter(storage=LocalStorage(tmp_path), executor="process")


async def test_cpu_bound_loop_needs_no_opt_in(tmp_path: Path) -> None:
    """At CPython's default switch interval the writer process still keeps up."""
    assert sys.getswitchinterval() == pytest.approx(0.005)
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path, on_backlog="coalesce", keep_last=3) as w:
        deadline = time.monotonic() + 20
        for ep in range(1, 100_000):
            add_episode(mem, ep)
            await w.submit(snapshot(mem, ep))
            _burn(0.001)
            await anyio.lowlevel.checkpoint()
            if w.stats.written >= 20 or time.monotonic() > deadline:
                break
        assert w.stats.written >= 20
    assert load_checkpoint(tmp_path).runtime.episode_index >= 20


async def test_dead_writer_process_is_replaced(tmp_path: Path) -> None:
    """A writer process killed between checkpoints is replaced by the next checkpoint,
    which is written (no checkpoint was in flight: none fails)."""
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path, on_error="warn") as w:
        add_episode(mem, 1)
        await (await w.submit(snapshot(mem, 1))).wait()
        (pid,) = _writer_pids(os.getpid())
        await kill_wholly(pid)
        add_episode(mem, 3)
        r = await (await w.submit(snapshot(mem, 3))).wait()
        (new,) = _writer_pids(os.getpid())
    assert r.episode_index == 3
    assert new != pid
    assert not r.incremental  # a new process starts from a full write
    assert w.stats.failed == 0
    assert load_checkpoint(tmp_path / "latest").memory.to_jsonl() == mem.to_jsonl()


def _run_child(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = textwrap.dedent(f"""
        import sys, time, anyio
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ckptwriter import CheckpointWriter, MemoryLog
        from conftest import add_episode, snapshot
        async def main():
            mem = MemoryLog()
            async with CheckpointWriter({str(tmp_path)!r}) as w:
                add_episode(mem, 1)
                await (await w.submit(snapshot(mem, 1))).wait()
                print("ready", flush=True)
    """) + textwrap.indent(textwrap.dedent(body), "        ") + "\nanyio.run(main)\n"
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)


async def test_writer_process_dies_with_its_parent(tmp_path: Path) -> None:
    """kill -9 of the training process takes its writer process with it."""
    proc = _run_child(tmp_path, "time.sleep(60)")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    (child,) = _writer_pids(proc.pid)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        await anyio.sleep(0.05)
    else:
        pytest.fail("writer process outlived its parent")
    async with CheckpointWriter(tmp_path):  # the lock died with it
        pass


async def test_sigint_to_the_group_spares_the_writer(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the group; the writer still drains the final save."""
    body = """
    import signal
    stop = anyio.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("armed", flush=True)
    with anyio.move_on_after(30):
        while not stop.is_set():
            await anyio.sleep(0.02)
    add_episode(mem, 2)
    await w.submit(snapshot(mem, 2))
    print("saved", flush=True)
    """
    proc = _run_child(tmp_path, body)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "armed"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.stdout.readline().strip() == "saved"
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()
    assert load_checkpoint(tmp_path / "latest").runtime.episode_index == 2


async def test_lock_names_the_training_process(tmp_path: Path) -> None:
    """The lock error names the process a user would stop, not its writer process."""
    from ckptwriter import DirectoryLockedError

    async with CheckpointWriter(tmp_path) as w:
        assert w.executor == "process"
        with pytest.raises(DirectoryLockedError, match=rf"\(pid {os.getpid()} on "):
            async with CheckpointWriter(tmp_path, executor="thread"):
                pass


@pytest.mark.parametrize("mib", [pytest.param(12, id="full-12MiB")])
async def test_large_delta_is_handed_over_as_a_file(tmp_path: Path, mib: int) -> None:
    """A delta above the pipe hand-off size arrives intact, incrementally after, no temp left."""
    from ckptwriter import Action

    mem = MemoryLog()
    big = "x" * 1000
    for _ in range(mib * 1024):
        mem.append(Action(content=big))
    async with CheckpointWriter(tmp_path, fsync=False) as w:
        r1 = await (await w.submit(snapshot(mem, 1))).wait()
        add_episode(mem, 2)
        r2 = await (await w.submit(snapshot(mem, 2))).wait()
    assert (r1.incremental, r2.incremental) == (False, True)
    assert r2.entries_serialized == 3
    assert load_checkpoint(tmp_path / "ep_000001").memory.nbytes == r1.bytes_serialized
    assert load_checkpoint(tmp_path / "latest").memory.to_jsonl() == mem.to_jsonl()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
