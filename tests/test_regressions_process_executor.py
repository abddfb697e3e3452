"""Review regressions: the writer-process executor (executor.py, writer_process.py).

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from ckptwriter import CheckpointWriter, MemoryLog, Observation, load_checkpoint
from ckptwriter.errors import StorageError
from conftest import add_episode, snapshot


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends: the process executor must work on each."""
    return str(request.param)


@pytest.fixture
def trio_threads_exit_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trio's idle worker threads exit after 10 s; make it 1.5 s so the test is quick."""
    import trio._core._thread_cache as cache

    # Long enough for the child to call prctl() first (~0.3 s), as it does in real runs.
    monkeypatch.setattr(cache, "IDLE_TIMEOUT", 1.5)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.usefixtures("trio_threads_exit_fast")
async def test_writer_process_survives_idle_worker_thread_exit(tmp_path: Path) -> None:
    """The writer process outlives the (trio) worker thread that spawned it."""
    # trio runs subprocess.Popen in a worker thread, and PR_SET_PDEATHSIG fires when that
    # *thread* exits, not the process: the writer is SIGKILLed once the thread idles out.
    mem = MemoryLog()
    async with CheckpointWriter(tmp_path / "ck", executor="process") as w:
        add_episode(mem, 1)
        await (await w.submit(snapshot(mem, 1))).wait()
        await anyio.sleep(3.0)
        add_episode(mem, 2)
        result = await (await w.submit(snapshot(mem, 2))).wait()
    assert result.name == "ep_000002"


@pytest.mark.anyio
async def test_close_after_idle_child_death_is_not_an_exception_group(tmp_path: Path) -> None:
    """A writer process that died between checkpoints does not turn close into an ExceptionGroup."""
    mem = MemoryLog()
    add_episode(mem, 1)
    w = CheckpointWriter(tmp_path / "ck", executor="process")

    async def train() -> None:
        async with w:
            await (await w.submit(snapshot(mem, 1))).wait()
            proc = w._executor._proc  # type: ignore[attr-defined]
            os.kill(proc.pid, signal.SIGKILL)  # e.g. the OOM killer, between checkpoints
            await proc.wait()
            raise RuntimeError("body")

    # The body's own exception reaches the caller unchanged, as it does with a thread.
    with pytest.raises(RuntimeError, match=r"^body$"):
        await train()


@pytest.mark.anyio
async def test_writer_process_that_cannot_start_raises_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer process that dies at start-up surfaces as StorageError, not a bare anyio error."""
    monkeypatch.setattr(sys, "executable", "/bin/false")  # e.g. a frozen or embedded python
    with pytest.raises(StorageError, match=r"^the checkpoint writer process"):
        async with CheckpointWriter(tmp_path / "ck", executor="process"):
            pass


@pytest.mark.anyio
async def test_writer_process_ignores_modules_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project file named like a stdlib module (secrets.py) does not break the writer process."""
    # `python -m` puts the cwd first on the child's sys.path; the parent (a console script,
    # or a script elsewhere) does not have it, so only the child imports the project file.
    project = tmp_path / "project"
    project.mkdir()
    (project / "secrets.py").write_text('API_KEY = "not the stdlib module"\n')
    monkeypatch.chdir(project)
    mem = MemoryLog()
    add_episode(mem, 1)
    async with CheckpointWriter(tmp_path / "ck", executor="process") as w:
        result = await (await w.submit(snapshot(mem, 1))).wait()
    assert result.name == "ep_000001"


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cpu_bound_loop_does_not_pace_the_transfer_to_the_writer_process(
    tmp_path: Path,
) -> None:
    """A CPU-bound loop that yields once per episode does not starve the writer process."""
    # The delta goes through the event loop's pipe transport, ~64 KiB per loop iteration:
    # as reviewed, 10 MB needs ~330 episodes of 5 ms (the thread executor: ~10).
    mem = MemoryLog([Observation(content="y" * 1000) for _ in range(10_000)])
    async with CheckpointWriter(tmp_path / "ck", executor="process", fsync=False) as w:
        handle = await w.submit(snapshot(mem, 1))
        episodes = 0
        while not handle.done():
            _burn(0.005)
            await anyio.lowlevel.checkpoint()
            episodes += 1
        await handle.wait()
    assert episodes < 60


# -- start-up failures say what happened ----------------------------------------------


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the interpreter the writer process runs on."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "says"), [
    pytest.param("kill -9 $$", r"was killed by SIGKILL at start-up", id="killed"),
    pytest.param("exit 1", r"exited with code 1 at start-up", id="silent-exit"),
])
async def test_writer_process_start_up_failure_names_what_happened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, says: str
) -> None:
    """A writer process that dies silently is not said to have printed an error."""
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, body))
    with pytest.raises(StorageError, match=rf"^the checkpoint writer process {says}") as info:
        async with CheckpointWriter(tmp_path / "ck", executor="process"):
            pass
    assert "printed above" not in str(info.value)


@pytest.mark.anyio
async def test_writer_process_that_cannot_import_points_at_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A writer process that fails to import prints its traceback, and the error says so."""
    broken = tmp_path / "broken" / "ckptwriter"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "writer_process.py").write_text("raise ImportError('a broken install')\n")
    # The real interpreter, given a package directory holding the broken copy.
    monkeypatch.setattr(sys, "executable", _fake_python(
        tmp_path, f'exec {sys.executable} "$1" "$2" {tmp_path / "broken"}'))
    with pytest.raises(StorageError, match=r"^the checkpoint writer process failed \(exit "
                                           r"code 3; its traceback is printed above"):
        async with CheckpointWriter(tmp_path / "ck", executor="process"):
            pass
    assert "ImportError: a broken install" in capfd.readouterr().err


# -- forks -------------------------------------------------------------------------------


def test_forked_child_does_not_hold_the_writer_process_open(tmp_path: Path) -> None:
    """A forked worker still alive at close: the writer process ends at once, not after 30 s."""
    script = textwrap.dedent(f"""
        import os, sys, time, anyio
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ckptwriter import CheckpointWriter, MemoryLog
        from conftest import add_episode, snapshot
        async def main():
            mem = MemoryLog()
            async with CheckpointWriter({str(tmp_path / "ck")!r}, executor="process") as w:
                add_episode(mem, 1)
                await (await w.submit(snapshot(mem, 1))).wait()
                pid = os.fork()
                if pid == 0:  # a worker (a DataLoader, a multiprocessing fork)
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 1)  # not the test's pipes: it reads them to the end
                    os.dup2(null, 2)
                    time.sleep(60)
                    os._exit(0)
                print(pid, flush=True)
                add_episode(mem, 2)
                await w.submit(snapshot(mem, 2))
                t0 = time.monotonic()
            print(time.monotonic() - t0, flush=True)
        anyio.run(main)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    worker, seconds = proc.stdout.split()
    os.kill(int(worker), signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr
    assert "exited with code" not in proc.stderr  # not killed by the close fallback
    assert float(seconds) < 15, "close waited for the forked worker"
    assert load_checkpoint(tmp_path / "ck" / "latest").runtime.episode_index == 2


# -- paths that are not UTF-8 ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("executor", ["process", "thread"])
async def test_checkpoint_dir_that_is_not_utf8(tmp_path: Path, executor: str) -> None:
    """A checkpoints directory named b"caf\\xe9": written, reported and read back."""
    ck = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9/ck"))
    mem = MemoryLog()
    async with CheckpointWriter(ck, executor=executor, keep_last=1) as w:  # type: ignore[arg-type]
        for ep in (1, 2):
            add_episode(mem, ep)
            result = await (await w.submit(snapshot(mem, ep))).wait()
    assert result.path == str(ck / "ep_000002")
    names = os.listdir(os.fsencode(ck))
    assert b"ep_000002" in names
    assert b"ep_000001" not in names  # retention ran there too
    assert load_checkpoint(ck / "latest").memory.to_jsonl() == mem.to_jsonl()


@pytest.mark.anyio
@pytest.mark.parametrize("executor", ["process", "thread"])
async def test_resumed_from_that_is_not_utf8_is_recorded_losslessly(
    tmp_path: Path, executor: str
) -> None:
    """Snapshot.resumed_from naming a non-UTF-8 path: every checkpoint commits, bytes kept."""
    source = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9/ck/ep_000007")
    mem = MemoryLog()
    add_episode(mem, 8)
    async with CheckpointWriter(tmp_path / "ck", executor=executor) as w:  # type: ignore[arg-type]
        await (await w.submit(snapshot(mem, 8, resumed_from=source))).wait()
    recorded = load_checkpoint(tmp_path / "ck" / "latest").runtime.resumed_from
    assert recorded is not None
    uri = urllib.parse.urlparse(recorded)
    assert uri.scheme == "file"
    assert urllib.parse.unquote_to_bytes(uri.path) == os.fsencode(source)
