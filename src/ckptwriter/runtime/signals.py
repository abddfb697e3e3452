"""SIGINT/SIGTERM/SIGHUP during training: a graceful stop first, an immediate exit second.

The first signal sets a :class:`StopFlag` that the loop reads after each episode, so the
run ends with a final checkpoint and a drained writer; the second exits the process.
SIGHUP (a dropped ssh connection, a closed terminal) is handled like SIGTERM, unless the
run was started with it ignored (``nohup``), which is then respected.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio
import anyio.abc

__all__ = ["StopFlag", "watch_signals"]

log = logging.getLogger("ckptwriter.runtime")


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a run: SIGINT, SIGTERM, and SIGHUP unless it is ignored.

    A SIGHUP already ignored when training starts was asked for (``nohup``, a job
    control shell): catching it would stop the very run that was meant to survive a
    hangup.
    """
    stops = (signal.SIGINT, signal.SIGTERM)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        return stops
    return (*stops, signal.SIGHUP)


class StopFlag:
    """Set by :func:`watch_signals` to the first signal received; read once per episode."""

    def __init__(self) -> None:
        self.signum: int | None = None


async def watch_signals(
    stop: StopFlag, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into a graceful stop; a second one exits at once.

    Start it with ``await tg.start(watch_signals, stop)`` so the handlers are installed
    before training begins.

    Args:
        stop: receives the first signal's number; the loop stops after its episode.
        task_status: reports start-up once the signal receiver is open.
    """
    with anyio.open_signal_receiver(*_stop_signals()) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.signum is None:
                stop.signum = signum
                log.warning(
                    "Received %s: finishing the current episode, writing a final checkpoint "
                    "and draining the writer (send it again to exit immediately)", name
                )
                continue
            # Committed checkpoints are whole (temp dir + rename); a write in progress
            # stays a .tmp-* directory that readers ignore and the next writer removes.
            os.write(2, f"Received {name} again: exiting immediately\n".encode())
            os._exit(128 + signum)
