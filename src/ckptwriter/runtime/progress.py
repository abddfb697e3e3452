"""How a training run reports progress: a rich progress bar on a terminal, or nothing.

The loop calls :meth:`Reporter.update` at most every :data:`UPDATE_SECONDS`, so a
reporter never costs the loop per-episode work.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Protocol

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["UPDATE_SECONDS", "NullReporter", "Reporter", "RichReporter", "TrainStatus",
           "is_terminal_error", "progress_enabled"]

# Ten refreshes a second is smooth to the eye and invisible in the loop's cost.
UPDATE_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class TrainStatus:
    """What the progress bar shows."""

    episode: int
    first_episode: int
    last_episode: int
    episodes_per_second: float
    last_checkpoint: str | None
    pending_writes: int
    val_score: float | None


class Reporter(Protocol):
    """Receives :class:`TrainStatus` updates while a run trains."""

    def update(self, status: TrainStatus) -> None:
        """Show the current status."""
        ...


class NullReporter:
    """Shows nothing (stderr is not a terminal, or ``--quiet``)."""

    def update(self, status: TrainStatus) -> None:
        """Ignore the status."""


def progress_enabled(stream: IO[str], quiet: bool) -> bool:
    """A bar only on a terminal and without ``--quiet``: logs and pipes stay clean."""
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


def is_terminal_error(exc: OSError) -> bool:
    """True for a write to a terminal (EIO) or a pipe (EPIPE) whose other side is gone."""
    return exc.errno in (errno.EIO, errno.EPIPE)


class RichReporter:
    """A rich progress bar on stderr; log lines print above it while it is live.

    Use as a context manager; :attr:`log_handler` routes ``logging`` through the bar's
    console so lines never tear the bar. A terminal that is gone when the bar stops (a
    dropped ssh connection) sets :attr:`terminal_lost` instead of raising: the run's own
    outcome is what the caller reports.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("episode {task.fields[episode]}"),
            BarColumn(),
            TextColumn("{task.fields[rate]} ep/s"),
            TextColumn("last ckpt {task.fields[ckpt]}"),
            TextColumn("pending {task.fields[pending]}"),
            TextColumn("val {task.fields[val]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=None, episode="-", rate="-", ckpt="-", pending=0, val="-"
        )
        self.log_handler: logging.Handler = RichHandler(
            console=self.console, show_path=False, markup=False, rich_tracebacks=False
        )
        self.terminal_lost = False

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._progress.stop()
        except OSError as err:
            if not is_terminal_error(err):
                raise
            self.terminal_lost = True

    def update(self, status: TrainStatus) -> None:
        """Move the bar."""
        self._progress.update(
            self._task,
            completed=status.episode,
            total=status.last_episode,
            episode=f"{status.episode}/{status.last_episode}",
            rate=f"{status.episodes_per_second:,.0f}",
            ckpt=status.last_checkpoint or "-",
            pending=status.pending_writes,
            val="-" if status.val_score is None else f"{status.val_score:.3f}",
        )
