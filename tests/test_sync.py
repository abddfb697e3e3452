"""SyncCheckpointWriter: the async writer's options and stats, from a plain loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckptwriter import (
    ConfigError,
    MemoryLog,
    SyncCheckpointWriter,
    list_checkpoints,
    verify_checkpoint,
)
from conftest import add_episode, snapshot


def test_sync_submit_counts_one_loop_sample_per_submit(tmp_path: Path) -> None:
    """Each sync submit is one loop-time sample: capture and thread hop included, once."""
    mem = MemoryLog()
    with SyncCheckpointWriter(tmp_path, fsync=False, executor="thread") as w:
        results = []
        for ep in range(1, 4):
            add_episode(mem, ep)
            results.append(w.submit(snapshot(mem, ep)).wait())
    s = w.stats
    assert s.loop_seconds_samples == tuple(r.loop_seconds for r in results)
    assert s.loop_seconds_total == pytest.approx(sum(s.loop_seconds_samples))
    assert all(x > 0 for x in s.loop_seconds_samples)


def test_sync_writer_validates_like_the_async_one(tmp_path: Path) -> None:
    """A bad option fails in the constructor with the writer's message."""
    with pytest.raises(ConfigError, match=r"^max_pending must be an int >= 1, got 0$"):
        SyncCheckpointWriter(tmp_path, max_pending=0)


_FORKING = textwrap.dedent("""
    import os, sys, time
    from ckptwriter import MemoryLog, Observation, Snapshot, SyncCheckpointWriter
    from ckptwriter.errors import WriterClosedError

    mem = MemoryLog()
    mem.append(Observation(content="first"))
    with SyncCheckpointWriter(sys.argv[1], executor=sys.argv[2]) as w:
        w.submit(Snapshot(1, 1, "A", mem)).wait()
        pending = w.submit(Snapshot(2, 2, "A", mem))
        pid = os.fork()
        if pid == 0:
            # The fork: using the parent's writer is refused, and leaving the block
            # (sys.exit here) waits for nothing.
            calls = {"submit": lambda: w.submit(Snapshot(3, 3, "A", mem)),
                     "flush": w.flush, "wait": pending.wait}
            for name, call in calls.items():
                try:
                    call()
                except WriterClosedError as exc:
                    assert "is a fork of it" in str(exc), exc
                    if name == "flush":
                        print(exc, flush=True)
                else:
                    # A handle already done gives its result, as after a close.
                    if name != "wait" or not pending.done():
                        raise AssertionError(name + " was not refused")
            sys.exit(7)
        for _ in range(6000):  # 60 s, bounded by polls
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise SystemExit("the forked child hung on its way out")
        assert os.waitstatus_to_exitcode(status) == 7, status
        pending.wait()
        mem.append(Observation(content="after the fork"))
        w.submit(Snapshot(4, 4, "A", mem)).wait()
    print("parent done", flush=True)
""")


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_fork_of_the_training_process_leaves_the_parents_writer_alone(
    tmp_path: Path, executor: str
) -> None:
    """A fork made while a SyncCheckpointWriter is open (os.fork, a fork-started worker)
    is refused its use with a message naming the fix, exits without hanging on the
    parent's writer thread, and the parent's writer goes on committing."""
    script = tmp_path / "forking.py"
    script.write_text(_FORKING)
    ck = tmp_path / "ck"
    proc = subprocess.run([sys.executable, str(script), str(ck), executor],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    refusal, done = proc.stdout.splitlines()
    assert refusal.startswith("this SyncCheckpointWriter belongs to process ")
    assert "open a new SyncCheckpointWriter in this process" in refusal
    assert done == "parent done"
    assert [r.episode_index for r in list_checkpoints(ck)] == [1, 2, 4]
    for ep in ("ep_000001", "ep_000002", "ep_000004"):
        verify_checkpoint(ck / ep)
