"""How ``ckptwriter train`` ends: signals at any moment, failures, a lost terminal, odd paths.

Every test runs the real command line in its own session and injects the fault for
real: signals to the process group, a killed writer process, a closed pty, directory
names that are not UTF-8.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from _runtime_util import cli, write_config
from ckptwriter import load_checkpoint, verify_checkpoint

# A run long enough never to finish by itself before the signal stops it, short enough
# (and with one checkpoint kept) that a run whose stop was lost ends on its own.
_LONG_RUN = ("runtime:\n  max_envs_to_visit: 300000\n  checkpoint_every_episodes: 100000\n"
             "  checkpoint_keep_last: 1\n")


def _train(cwd: Path, text: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    write_config(cwd, "c", text)
    kw: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    kw.update(popen)
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "ckptwriter", "train", "--config", "c.yaml", *args],
        cwd=cwd, text=True, start_new_session=True, **kw,
    )


def _children(pid: int) -> list[int]:
    """Children of any thread of ``pid`` (a process may be started from a worker thread)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _at_fork(proc: subprocess.Popen[str], cwd: Path) -> bool:
    return bool(_children(proc.pid))


def _at_exec(proc: subprocess.Popen[str], cwd: Path) -> bool:
    return any(b"ckptwriter.writer_process" in _cmdline(c) for c in _children(proc.pid))


def _importing(proc: subprocess.Popen[str], cwd: Path) -> bool:
    # Half-way through its imports: msgspec's extension is mapped, its signals not set.
    for c in _children(proc.pid):
        try:
            if b"_core." in Path(f"/proc/{c}/maps").read_bytes() and b"writer_process" in \
                    _cmdline(c):
                return True
        except OSError:
            pass
    return False


def _lock_taken(proc: subprocess.Popen[str], cwd: Path) -> bool:
    return any(cwd.glob("outputs/c/*/checkpoints/.lock"))


# Moments of the writer process's start-up: forked (not yet the writer's program), its
# program started, half-way through its imports (signals not yet set up), and the
# directory opened.
_MOMENTS: dict[str, Callable[[subprocess.Popen[str], Path], bool]] = {
    "fork": _at_fork, "exec": _at_exec, "importing": _importing, "open": _lock_taken,
}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(("sig", "code"), [
    pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
    pytest.param(signal.SIGINT, 130, id="SIGINT"),
    pytest.param(signal.SIGHUP, 129, id="SIGHUP"),
])
def test_group_signal_while_the_writer_process_starts(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """A signal to the group at each moment of the writer's start-up: final checkpoint, 128+N."""
    for moment, reached in _MOMENTS.items():
        cwd = tmp_path / moment
        cwd.mkdir()
        proc = _train(cwd, _LONG_RUN)
        # Bounded by the run itself: it cannot end before the signal that stops it.
        while not reached(proc, cwd) and proc.poll() is None:
            time.sleep(0.0002)
        os.killpg(proc.pid, sig)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == code, f"{moment}: {err}"
        assert "printed above" not in err
        stopped = int(out.split("Stopped at episode ")[1].split("/")[0])
        (ck,) = (cwd / "outputs" / "c").glob("*/checkpoints")
        latest = json.loads((ck / "latest.json").read_text())
        assert latest["episode_index"] == stopped, moment
        assert "the last durable checkpoint is " in out


# An agent that breaks at its first act once ep_000020 is durable (latest.json names it;
# the loop may have gone further by then, however busy the machine is).
_AGENT = (
    "import json, os, pathlib, signal, time\n"
    "from ckptwriter.runtime import HistoryAgent\n"
    "def children():\n"
    "    out = []\n"
    "    for t in pathlib.Path(f'/proc/{os.getpid()}/task').glob('*'):\n"
    "        out += [int(c) for c in (t / 'children').read_text().split()]\n"
    "    return out\n"
    "def latest():\n"
    "    try:\n"
    "        [p] = pathlib.Path('outputs').glob('*/*/checkpoints/latest.json')\n"
    "        return json.loads(p.read_text())['episode_index']\n"
    "    except (ValueError, OSError):\n"
    "        return 0\n"
    "def kill_writer():\n"
    "    # As the OOM killer would; then wait until it is really dead (a zombie).\n"
    "    [pid] = children()\n"
    "    os.kill(pid, signal.SIGKILL)\n"
    "    while pathlib.Path(f'/proc/{pid}/stat').read_text().split()[2] != 'Z':\n"
    "        time.sleep(0.005)\n"
    "class Breaks(HistoryAgent):\n"
    "    broken = False\n"
    "    async def act(self, observation):\n"
    "        if not Breaks.broken and latest() >= 20:\n"
    "            Breaks.broken = True\n"
    "            BREAK\n"
    "        return await super().act(observation)\n"
)
_NOTE = re.compile(r"the last durable checkpoint is (\S+); to continue from it, set "
                   r"runtime.resume_from: (\S+)\n\Z")


@pytest.mark.parametrize(("statement", "first_line"), [
    pytest.param("kill_writer()", r"error: checkpoint for episode \d+ .*: the checkpoint "
                 r"writer process exited unexpectedly \(it was killed by SIGKILL\)",
                 id="writer-killed"),
    pytest.param("raise ValueError('the agent broke')",
                 r"Traceback \(most recent call last\):", id="agent-exception"),
    pytest.param("return 5", r"error: Breaks.act returned int, expected str",
                 id="agent-protocol"),
])
def test_failure_exit_names_the_checkpoint_to_resume_from(
    tmp_path: Path, statement: str, first_line: str
) -> None:
    """A run that fails prints its last durable checkpoint; that resume_from continues it."""
    (tmp_path / "agent.py").write_text(_AGENT.replace("BREAK", statement))
    proc = _train(tmp_path, "agent:\n  type: agent:Breaks\nruntime:\n"
                  "  checkpoint_every_episodes: 10\n  max_envs_to_visit: 100000\n", "-q")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert re.match(first_line, err), err
    note = _NOTE.search(err)
    assert note is not None, err
    where, resume_from = note.groups()
    assert where == resume_from
    (ck,) = (tmp_path / "outputs" / "c").glob("*/checkpoints")
    named = tmp_path / where
    assert named.parent == ck
    on_disk = int(os.readlink(ck / "latest").removeprefix("ep_"))
    episode = verify_checkpoint(named).episode_index
    if "kill" in statement:
        # Only what the writer acknowledged is named: the commit it was killed right
        # after (latest.json moved, no reply yet) is on disk but was reported failed.
        assert 10 <= episode <= on_disk
    else:
        assert episode == on_disk >= 20  # the writer drained what was submitted
    # The advice works: the run continues from there.
    cfg = write_config(tmp_path, "more", "runtime:\n  executor: thread\n"
                       "  checkpoint_every_episodes: 10\n")
    assert cli(["train", "-q", "--config", str(cfg), "--set",
                f"runtime.resume_from={resume_from}", "--set",
                f"runtime.max_envs_to_visit={episode + 10}"], tmp_path) == 0
    (more,) = (tmp_path / "outputs" / "more").glob("*/checkpoints/latest")
    resumed = load_checkpoint(more)
    assert resumed.runtime.episode_index == episode + 10
    assert resumed.runtime.resumed_from == str(named.resolve())


def test_hangup_with_the_terminal_gone_still_exits_129(tmp_path: Path) -> None:
    """SIGHUP after the terminal closed (writes fail with EIO): final checkpoint, exit 129."""
    master, slave = os.openpty()
    stop = threading.Event()

    def drain() -> None:
        # The progress bar redraws ten times a second; an unread pty would fill and block.
        while not stop.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = _train(tmp_path, "runtime:\n  checkpoint_on_start: true\n"
                      "  max_envs_to_visit: 300000\n  checkpoint_every_episodes: 100000\n"
                      "  checkpoint_keep_last: 1\n",
                      stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        # checkpoint_on_start: ep_000000 is written before any episode, so its latest
        # appears whatever the machine's speed; the bar is live by then.
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("outputs/c/*/checkpoints/latest")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
    finally:
        stop.set()
        reader.join()
    os.close(master)  # the terminal is gone: every write to it now fails with EIO
    os.killpg(proc.pid, signal.SIGHUP)  # what the kernel sends the session on hangup
    try:
        assert proc.wait(timeout=120) == 129
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (ck,) = tmp_path.glob("outputs/c/*/checkpoints")
    final = load_checkpoint(ck / "latest")
    assert final.runtime.episode_index > 0  # the final checkpoint, past ep_000000
    verify_checkpoint(final.path)


# -- paths that are not UTF-8 --------------------------------------------------------


@pytest.fixture
def latin1_dir(tmp_path: Path) -> Path:
    """A directory named b"caf\\xe9" (Latin-1 "café"): valid on POSIX, not UTF-8."""
    d = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    d.mkdir()
    return d


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_train_and_resume_in_a_working_directory_that_is_not_utf8(
    latin1_dir: Path, executor: str
) -> None:
    """A run and its resume work in a non-UTF-8 directory; resumed_from keeps every byte."""
    text = f"runtime:\n  executor: {executor}\n  checkpoint_every_episodes: 5\n"
    first = _train(latin1_dir, text + "  max_envs_to_visit: 10\n")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    again = _train(latin1_dir, text + "  max_envs_to_visit: 15\n",
                   "--set", "runtime.resume_from=outputs/c")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    runs = sorted((latin1_dir / "outputs" / "c").iterdir())
    ck = load_checkpoint(runs[-1] / "checkpoints" / "latest")
    assert ck.runtime.episode_index == 15
    recorded = ck.runtime.resumed_from
    assert recorded is not None
    uri = urllib.parse.urlparse(recorded)
    assert uri.scheme == "file"
    assert urllib.parse.unquote_to_bytes(uri.path) == os.fsencode(
        runs[0] / "checkpoints" / "ep_000010")


def test_set_value_that_is_not_utf8_is_refused_naming_it(latin1_dir: Path) -> None:
    """--set with a non-UTF-8 path: exit 2 and a message naming it, before any run."""
    proc = _train(latin1_dir.parent, "runtime:\n  max_envs_to_visit: 5\n",
                  "--set", f"runtime.checkpoint_dir={latin1_dir}/ck")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.startswith(f"error: --set runtime.checkpoint_dir={latin1_dir.parent}/caf\\xe9/ck: "
                          "the value is not valid UTF-8 text"), err
    assert not (latin1_dir.parent / "outputs").exists()


def test_failure_under_resume_auto_says_to_run_the_same_command(tmp_path: Path) -> None:
    """Under resume_from: auto the note says to run the command again (naming the
    checkpoint would start a new run directory and break auto's chain), and that works."""
    (tmp_path / "agent.py").write_text(_AGENT.replace("BREAK", "raise ValueError('boom')"))
    config = ("agent:\n  type: agent:Breaks\nruntime:\n  resume_from: auto\n"
              "  checkpoint_every_episodes: 10\n  max_envs_to_visit: 100000\n")
    proc = _train(tmp_path, config, "-q")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert re.search(r"the last durable checkpoint is \S+; to continue from it, run the "
                     r"same command again \(resume_from: auto continues in place\)\n\Z", err), err
    assert _NOTE.search(err) is None
