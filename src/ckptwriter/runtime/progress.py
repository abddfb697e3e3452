"""How a training run reports progress: a rich progress bar on a terminal, or nothing.

The loop calls :meth:`Reporter.update` at most every :data:`UPDATE_SECONDS`, so a
reporter never costs the loop per-episode work. Log lines have one format
(:data:`LOG_FORMAT`) on a terminal and in a pipe, and paths one style
(:func:`display_path`).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..storage.location import parse_location
from ..storage.urlpath import URLPath

__all__ = ["LOG_DATEFMT", "LOG_FORMAT", "UPDATE_SECONDS", "NullReporter", "Reporter",
           "RichReporter", "TrainStatus", "display_path", "is_terminal_error",
           "log_formatter", "progress_enabled"]

# The one format of the run's log lines, above a progress bar or into a pipe or file.
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATEFMT = "%H:%M:%S"

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
    val_score: float | None
    # Snapshots the writer has not finished: queued plus the one being written.
    writer_pending: int = 0
    max_pending: int | None = None

    @property
    def writing(self) -> int:
        """The snapshot being written: 0 or 1."""
        return min(1, self.writer_pending)

    @property
    def queued(self) -> int:
        """Snapshots waiting besides the one being written: at most ``max_pending``, so
        ``queued 2/2, writing 1`` is a full queue."""
        return max(0, self.writer_pending - 1)


def display_path(path: str | os.PathLike[str]) -> str:
    """A local path as the run's messages print it: relative to the working directory
    when under it, else absolute; a URL as it is."""
    if isinstance(path, URLPath) or not parse_location(os.fspath(path)).is_local:
        return str(path)
    absolute = os.path.abspath(os.fspath(path))
    rel = os.path.relpath(absolute, os.getcwd())
    return absolute if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def log_formatter() -> logging.Formatter:
    """The formatter of :data:`LOG_FORMAT`."""
    return logging.Formatter(LOG_FORMAT, LOG_DATEFMT)


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
            TextColumn("{task.fields[queue]}"),
            TextColumn("val {task.fields[val]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._progress.add_task(
            "train", total=None, episode="-", rate="-", ckpt="-", queue="queued -", val="-"
        )
        self.log_handler: logging.Handler = _ConsoleHandler(self.console)
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
            queue=_queue_text(status),
            val="-" if status.val_score is None else f"{status.val_score:.3f}",
        )


def _queue_text(status: TrainStatus) -> str:
    limit = "" if status.max_pending is None else f"/{status.max_pending}"
    return f"queued {status.queued}{limit}, writing {status.writing}"


class _ConsoleHandler(logging.Handler):
    """Log lines in :data:`LOG_FORMAT`, printed above the live bar (never tearing it)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(log_formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False,
                               soft_wrap=True)
        except OSError as exc:
            if not is_terminal_error(exc):
                self.handleError(record)
