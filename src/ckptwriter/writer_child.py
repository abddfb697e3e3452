"""Starting the writer process and watching it from the training process.

The child is a fresh interpreter (``writer_process.run``) with the group signals blocked
from its first instruction; :class:`Child` reads its replies and awaits its exit without
a thread (a pidfd where Linux has one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio

from . import wire

__all__ = ["Child", "describe_exit", "spawn"]

# The child runs this, with its own package directory first on sys.path: `-m` would put
# the user's working directory there, where a local `secrets.py` could shadow stdlib. A
# child that cannot even import says so with its own exit code, after its traceback.
_CHILD_CODE = (
    "import sys\nsys.path[0] = sys.argv[1]\n"
    "try:\n    from ckptwriter.writer_process import run\n"
    "except Exception:\n    import traceback; traceback.print_exc()\n"
    f"    sys.exit({wire.EXIT_CRASHED})\n"
    "run()"
)
# Signals a terminal or a process manager sends to the whole process group. The child
# is started with them blocked (the mask survives fork and exec) and ignores them before
# it unblocks them: no moment of its life can be killed by the stop the parent handles.
_GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

# Where the ckptwriter package lives, so the child imports this very copy of it.
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)


def describe_exit(code: int | None) -> str:
    """How a writer process ended, as a message says it: never an error that is not there."""
    if code is None:
        return "was not started"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == wire.EXIT_CRASHED:
        return f"failed (exit code {code}; its traceback is printed above, on stderr)"
    return f"exited with code {code}"


def spawn(stdin: int, stdout: int, keep: int | None = None) -> subprocess.Popen[bytes]:
    """Start the child with the group signals blocked (run in a worker thread), with
    the fd ``keep`` inherited at the same number."""
    # Only this worker thread's mask changes: a signal arriving meanwhile goes to the
    # main thread, whose handlers the parent's stop relies on.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
    try:
        return subprocess.Popen([sys.executable, "-c", _CHILD_CODE, _PKG_ROOT],
                                stdin=stdin, stdout=stdout, stderr=None,
                                pass_fds=() if keep is None else (keep,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Child:
    """A running writer process: its replies pipe and its exit, awaited without a thread."""

    def __init__(self, popen: subprocess.Popen[bytes], out: int) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.out: int | None = out
        os.set_blocking(out, False)
        try:
            self.pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # not Linux: poll for the exit

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def exited(self) -> bool:
        """Whether it has exited (reaped now if so), without waiting."""
        return self._popen.poll() is not None

    async def receive_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self.out is None:
                raise anyio.ClosedResourceError
            try:
                chunk = os.read(self.out, n - len(buf))
            except BlockingIOError:
                await anyio.wait_readable(self.out)
                continue
            if not chunk:
                raise anyio.IncompleteRead
            buf += chunk
        return bytes(buf)

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:
            if self.pidfd is not None:
                await anyio.wait_readable(self.pidfd)
            else:
                await anyio.sleep(0.02)
        return code

    def kill(self) -> None:
        if self._popen.returncode is None:
            self._popen.kill()

    def close(self) -> None:
        """Close our fds (the process itself is left alone)."""
        for fd in (self.out, self.pidfd):
            if fd is not None:
                os.close(fd)
        self.out = self.pidfd = None


