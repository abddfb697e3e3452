"""Review regressions: the writer-process executor (executor.py, writer_process.py).

Each test fails on the code as reviewed and passes once the finding is fixed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from ckptwriter import CheckpointWriter, MemoryLog, Observation
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
