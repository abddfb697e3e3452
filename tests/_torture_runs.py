"""Training runs to SIGKILL after a given number of saved checkpoints, forked from a warm
interpreter (``python _torture_runs.py``), for the torture with a concurrent reader.

Each request (one JSON line on stdin) runs ``ckptwriter.cli.main(argv)`` in a forked
child in its own process group, its log (stderr) read through a pipe. Once the run has
logged ``kill_after`` saved checkpoints and ``delay`` seconds more have passed, the whole
group (the run and its writer process) is SIGKILLed; the reply (one JSON line) comes once
no process of the group is left, so the next run never meets a writer of the last one.
``kill_after: 0`` lets the run finish. Kills are bounded by work (checkpoints saved),
never by how fast the machine is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

# The log line of a checkpoint that is durable ("Checkpoint ep_000007 saved ...").
_SAVED = re.compile(rb"\bCheckpoint ep_\d+ saved\b")
# Seconds the members of a killed group may take to be torn down by the kernel: a hang,
# not slowness, if exceeded.
_GONE_TIMEOUT = 120


def _fork_run(argv: list[str], log_fd: int, err_fd: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.setpgid(0, 0)
            os.dup2(log_fd, 1)
            os.dup2(err_fd, 2)
            from ckptwriter import cli

            code = cli.main(argv)
        finally:
            os._exit(code)
    return pid


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` is alive (zombies do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            # After the command: state, ppid, pgrp.
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def wait_group_gone(pgid: int) -> None:
    """Return once no process of group ``pgid`` is left (after its leader's SIGKILL)."""
    deadline = time.monotonic() + _GONE_TIMEOUT
    while group_alive(pgid):
        if time.monotonic() > deadline:
            raise SystemExit(f"process group {pgid} still alive {_GONE_TIMEOUT} s after SIGKILL")
        time.sleep(0.005)


def _round(req: dict[str, object]) -> dict[str, object]:
    kill_after = int(str(req["kill_after"]))
    r, w = os.pipe()
    with open(str(req["log"]), "ab") as logf:
        pid = _fork_run([str(a) for a in req["argv"]], logf.fileno(), w)  # type: ignore[attr-defined]
        os.close(w)
        saved = 0
        killed = False
        with os.fdopen(r, "rb") as err:
            for line in err:
                logf.write(line)
                if _SAVED.search(line):
                    saved += 1
                    if kill_after and saved == kill_after and not killed:
                        time.sleep(float(str(req["delay"])))
                        os.killpg(pid, signal.SIGKILL)
                        killed = True
                        break
    _, status = os.waitpid(pid, 0)
    wait_group_gone(pid)
    return {"killed": killed and os.WIFSIGNALED(status),
            "exit": os.waitstatus_to_exitcode(status), "saved": saved}


def _serve() -> None:
    # Warm imports for the forked runs, what a run would otherwise import lazily (its event
    # loop, the S3 client of an s3:// checkpoint_dir) included.
    import anyio._backends._asyncio
    import anyio.to_thread  # noqa: F401
    import rich._emoji_codes  # noqa: F401
    import s3fs  # noqa: F401

    import ckptwriter.cli
    import ckptwriter.runtime.loop  # noqa: F401

    for line in sys.stdin:
        print(json.dumps(_round(json.loads(line))), flush=True)


if __name__ == "__main__":
    _serve()
