"""Fault injection helpers for the reliability tests (tests/test_reliability*.py).

This module is also the child program of the subprocess tests: ``python _fault_util.py
<command> ...`` runs a writer in a fresh interpreter so that a crash (``os._exit``,
SIGKILL) is a real process death, not an exception the test could catch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio

from ckptwriter import (
    Action,
    CheckpointWriter,
    Feedback,
    FeedbackContent,
    MemoryLog,
    Observation,
    Reflection,
    Snapshot,
    layout,
)
from ckptwriter.storage import LocalStorage
from ckptwriter.storage.base import PendingCheckpoint

PY = sys.executable
HERE = Path(__file__).resolve()
# Exit status a crash injected with os._exit uses, so a test can tell it from a bug.
CRASH_EXIT = 17


# -- deterministic training data -------------------------------------------------------


def episode_entries(ep: int, pad: int = 0) -> list[Observation | Action | Feedback | Reflection]:
    """The memory entries episode ``ep`` appends: a pure function of ``ep``."""
    return [
        Observation(content=f"Solve: {ep}+{ep}=?"),
        Action(content=str(2 * ep)),
        Feedback(content=FeedbackContent(score=1.0 if ep % 3 else 0.5, message=f"ep {ep}")),
        Reflection(content=f"lesson {ep} " + "x" * pad),
    ]


def memory_until(ep: int, pad: int = 0) -> MemoryLog:
    """The memory of a run after episodes 1..ep."""
    log = MemoryLog()
    for i in range(1, ep + 1):
        log.extend(episode_entries(i, pad))
    return log


def snapshot(ep: int, log: MemoryLog, **kw: object) -> Snapshot:
    """The snapshot the tests submit at the end of episode ``ep``."""
    return Snapshot(ep, ep * 4, "HistoryAgent", log, **kw)  # type: ignore[arg-type]


async def write_episodes(
    root: Path, episodes: range, *, pad: int = 0, **writer_kw: object
) -> MemoryLog:
    """Run a writer over ``episodes`` (appending each episode's entries) and flush."""
    log = memory_until(episodes.start - 1, pad)
    async with CheckpointWriter(root, **writer_kw) as w:  # type: ignore[arg-type]
        for ep in episodes:
            log.extend(episode_entries(ep, pad))
            await w.submit(snapshot(ep, log))
        await w.flush()
    return log


def build_checkpoints(root: Path, last: int, *, pad: int = 0, **writer_kw: object) -> MemoryLog:
    """Synchronously write checkpoints 1..last into ``root``."""

    async def main() -> MemoryLog:
        return await write_episodes(root, range(1, last + 1), pad=pad, **writer_kw)

    return anyio.run(main)


# -- storages that misbehave on purpose ------------------------------------------------


class FaultStorage(LocalStorage):
    """A LocalStorage that runs ``action(step)`` right after ``step`` of one episode."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        step: str,
        episode: int,
        action: Callable[[str], None],
        fsync: bool = True,
    ) -> None:
        super().__init__(root, fsync=fsync)
        if step not in self.STEPS:
            raise ValueError(f"unknown step {step!r}")
        self.fault_step = step
        self.fault_episode = episode
        self.action = action
        self.steps_seen: list[str] = []
        self._episode: int | None = None

    def begin(self, name: str) -> PendingCheckpoint:
        # replace_pointer and delete follow in the same worker call: they belong to it.
        self._episode = layout.parse_checkpoint_name(name)
        return super().begin(name)

    def _step(self, name: str) -> None:
        self.steps_seen.append(name)
        if name == self.fault_step and self._episode == self.fault_episode:
            self.action(name)


def exit_now(step: str) -> None:
    """Die on the spot, as a power cut or OOM kill would: no cleanup, no flush."""
    os._exit(CRASH_EXIT)


def raise_eio(step: str) -> None:
    """The disk fails the operation right after ``step``."""
    raise OSError(errno.EIO, f"injected I/O error after {step}")


class SlowStorage(LocalStorage):
    """A disk that takes ``delay`` seconds for every commit."""

    def __init__(self, root: str | os.PathLike[str], *, delay: float) -> None:
        super().__init__(root, fsync=False)
        self.delay = delay

    def begin(self, name: str) -> PendingCheckpoint:
        time.sleep(self.delay)
        return super().begin(name)


# -- inspection ------------------------------------------------------------------------


def leftovers(root: Path) -> list[str]:
    """Temp and trash entries in a checkpoints directory."""
    return sorted(n for n in os.listdir(root) if n.startswith((".tmp-", ".trash-", ".replaced-")))


def tree_digest(root: Path) -> dict[str, tuple[int, str, int]]:
    """relative path -> (mode, sha256 or link target, mtime_ns) of everything under root."""
    out: dict[str, tuple[int, str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                content = "->" + os.readlink(p)
            elif p.is_dir():
                content = "dir"
            else:
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (st.st_mode, content, st.st_mtime_ns)
    return out


# -- a real, small filesystem ----------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path``; skip the test where mounting is refused."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy unmount: a file still open somewhere must not leave the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    """Remount a tmpfs ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill_disk(path: Path, leave: int) -> Path:
    """Write a filler file until only about ``leave`` bytes stay free on its filesystem."""
    filler = path / "filler.bin"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))
    return filler


# -- subprocess children ---------------------------------------------------------------


def run_child(*args: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run this module as a child program."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [PY, str(HERE), *args], capture_output=True, text=True, timeout=timeout, check=False,
        **kw,
    )


def _child_crash(root: str, step: str, action: str) -> None:
    """Write episodes 1..3 (keep_last=2) and fault right after ``step`` of episode 3."""
    act = exit_now if action == "exit" else raise_eio
    storage = FaultStorage(root, step=step, episode=3, action=act)

    async def main() -> None:
        log = MemoryLog()
        async with CheckpointWriter(storage=storage, keep_last=2) as w:
            for ep in (1, 2, 3):
                log.extend(episode_entries(ep))
                await (await w.submit(snapshot(ep, log))).wait()

    anyio.run(main)


def _child_hold_lock(root: str) -> None:
    """Open a writer, write one checkpoint, report, then wait to be killed."""

    async def main() -> None:
        async with CheckpointWriter(root) as w:
            await (await w.submit(snapshot(1, memory_until(1)))).wait()
            print("ready", flush=True)
            await anyio.sleep(60)

    anyio.run(main)


def _child_umask(root: str, umask: str, executor: str) -> None:
    """Write checkpoints under a given umask (the writer process inherits it)."""
    os.umask(int(umask, 8))
    build_checkpoints(Path(root), 3, keep_last=2, executor=executor)


def _child_resume(source: str, dest: str, go: str) -> None:
    """Load ``source``, wait for the go file, then continue training into ``dest``."""
    from ckptwriter import load_checkpoint

    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest + ".ready").touch()
    deadline = time.monotonic() + 20
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.001)
    loaded = load_checkpoint(source)
    log = loaded.memory
    start = loaded.runtime.episode_index

    async def main() -> None:
        async with CheckpointWriter(dest) as w:
            for ep in range(start + 1, start + 6):
                log.extend(episode_entries(ep))
                await w.submit(snapshot(ep, log, resumed_from=str(loaded.path)))
            await w.flush()

    anyio.run(main)
    print(json.dumps({"resumed_at": start, "entries": len(log)}), flush=True)


def _child_as_nobody(root: str, phase: str) -> None:
    """Drop root (imports done first), then open a writer where nobody may not write."""
    from ckptwriter import CheckpointError

    # Warm up everything lazy before losing the right to read root's files.
    anyio.run(anyio.sleep, 0)
    anyio.run(anyio.to_thread.run_sync, lambda: None)
    os.setgid(65534)
    os.setuid(65534)

    async def main() -> None:
        log = memory_until(1)
        # A thread: `nobody` may not exec this venv's python (it lives under /root).
        async with CheckpointWriter(root, executor="thread") as w:
            await w.submit(snapshot(1, log))
            await w.flush()
            if phase == "midrun":
                # The owner takes its own write permission away while the run goes on.
                os.chmod(root, 0o555)
                log.extend(episode_entries(2))
                await w.submit(snapshot(2, log))
                await w.flush()

    try:
        anyio.run(main)
    except CheckpointError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                          "cause": str(exc.__cause__)}), flush=True)
        raise SystemExit(3) from None


def _fork_cli(argv: list[str], out_fd: int, *, own_group: bool) -> int:
    """Fork a child that runs ``ckptwriter <argv>`` (already imported) with output to out_fd."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            if own_group:
                os.setpgid(0, 0)
            os.dup2(out_fd, 1)
            os.dup2(out_fd, 2)
            from ckptwriter import cli

            code = cli.main(argv)
        finally:
            os._exit(code)
    return pid


def _newest_ckpt_dir(runs: Path, before: set[str]) -> Path | None:
    try:
        new = sorted(set(os.listdir(runs)) - before)
    except FileNotFoundError:
        return None
    return runs / new[-1] / "checkpoints" if new else None


def _zygote_round(req: dict[str, object]) -> dict[str, object]:
    """One training run forked from this warm interpreter, SIGKILLed once it checkpoints."""
    import random

    rng = random.Random(str(req["seed"]))
    runs = Path(str(req["runs"]))
    before = set(os.listdir(runs)) if runs.exists() else set()
    with open(str(req["log"]), "ab") as logf:
        pid = _fork_cli(list(req["argv"]), logf.fileno(), own_group=True)  # type: ignore[call-overload]
    killed = reaped = False
    status = 0
    if req["kill"]:
        deadline = time.monotonic() + 30
        # Wait for the first checkpoint activity of this run, then kill a random moment later.
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                break
            ckpts = _newest_ckpt_dir(runs, before)
            with contextlib.suppress(FileNotFoundError):
                if ckpts is not None and any(
                    n.startswith(("ep_", ".tmp-ep_")) for n in os.listdir(ckpts)
                ):
                    time.sleep(rng.uniform(0, float(str(req["max_delay"]))))
                    # Half the kills hit only the run (its writer process follows by
                    # PDEATHSIG), half the run and its writer process at once.
                    target = -pid if rng.random() < 0.5 else pid
                    os.kill(target, signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.001)
        else:
            os.kill(-pid, signal.SIGKILL)
    if not reaped:
        _, status = os.waitpid(pid, 0)
    if killed:
        # A kill of the run alone leaves its writer process to notice and follow: what
        # "after a kill -9" means is once no process of the run (its group) is left.
        from _torture_runs import wait_group_gone

        wait_group_gone(pid)
    ckpts = _newest_ckpt_dir(runs, before)
    reply: dict[str, object] = {
        "killed": killed and os.WIFSIGNALED(status),
        "exit": os.waitstatus_to_exitcode(status),
        "checkpoints": str(ckpts) if ckpts else None,
    }
    if ckpts is not None and ckpts.exists():
        r, w = os.pipe()
        vpid = _fork_cli(["verify", str(ckpts)], w, own_group=False)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        _, vstatus = os.waitpid(vpid, 0)
        reply["verify_exit"] = os.waitstatus_to_exitcode(vstatus)
        reply["verify_out"] = b"".join(chunks).decode(errors="replace")
    return reply


def _child_zygote() -> None:
    """Serve training runs to kill: one JSON request per stdin line, one JSON reply each.

    The interpreter imports ckptwriter's CLI and runtime once; each run is a fork of it,
    so 50 kills do not pay 50 interpreter start-ups (the writer process, when the config
    uses one, is still a fresh interpreter, as in production).
    """
    # Warm imports for the forked runs, what a run would otherwise import lazily included.
    import anyio._backends._asyncio
    import anyio.to_thread  # noqa: F401
    import rich._emoji_codes  # noqa: F401

    import ckptwriter.cli
    import ckptwriter.config
    import ckptwriter.runtime
    import ckptwriter.runtime.loop  # noqa: F401

    for line in sys.stdin:
        print(json.dumps(_zygote_round(json.loads(line))), flush=True)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a child we started and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)  # reaps it and closes its pipes


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {
        "crash": _child_crash,
        "hold-lock": _child_hold_lock,
        "umask": _child_umask,
        "resume": _child_resume,
        "as-nobody": _child_as_nobody,
        "zygote": _child_zygote,
    }[cmd](*rest)


def record_protocol(monkeypatch: Any) -> list[tuple[str, str]]:
    """Record the local backend's fsyncs (the path of the fd), renames and replaces
    (``src -> dst``, relative to the directory descriptor), in order, as they happen."""
    from ckptwriter.storage import local as local_mod

    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str, dst: str, **kw: int) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst, **kw)

    def replace(src: str, dst: str, **kw: int) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(local_mod.os, "fsync", fsync)
    monkeypatch.setattr(local_mod.os, "rename", rename)
    monkeypatch.setattr(local_mod.os, "replace", replace)
    return events


def writer_process_pid() -> int:
    """The pid of this process's one writer process."""
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "ckptwriter.writer_process"],
                         capture_output=True, text=True, check=False).stdout
    (pid,) = (int(p) for p in out.split())
    return pid



async def kill_wholly(pid: int) -> None:
    """SIGKILL writer process ``pid`` (as the OOM killer would, between checkpoints) and
    return once it is wholly gone (every thread), left for its parent to reap."""
    import anyio

    os.kill(pid, signal.SIGKILL)
    for _ in range(2000):
        # WNOHANG: never waits; WNOWAIT: the writer still reaps it.
        if os.waitid(os.P_PID, pid,  # noqa: ASYNC222
                     os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"writer process {pid} did not die")
