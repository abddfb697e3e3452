"""Existing steps: a writer refuses an episode its directory already has, or one below it.

A writer restarted at episode 1 in a directory holding episodes 10, 15 and 20 used to
overwrite ep 10, have retention (which orders by episode) delete its own new ep 5, and
move ``latest`` back. ``submit`` now refuses such an episode with
:class:`~ckptwriter.CheckpointExistsError` at once, unless called with ``replace=True``.

Refused: an episode at or below the newest one committed in the directory (found at
open, then moved by each commit) or submitted to this writer and still queued or being
written. Not refused: an episode whose earlier submit failed (it created nothing), or
coalesced into a newer snapshot before it was written (that newer one counts instead).

Cost: O(1) per submit in the number of checkpoints (the newest committed episode is
kept; the queue is bounded by ``max_pending``); the list of committed names is read
only to word the error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from . import layout
from .errors import CheckpointExistsError
from .retention import CheckpointRecord

__all__ = ["EpisodeGuard"]


class EpisodeGuard:
    """The newest committed episode of one checkpoints directory, for ``submit`` to check.

    Args:
        location: the directory, as errors name it.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        self.newest: int | None = None

    def opened(self, records: Iterable[CheckpointRecord]) -> None:
        """Learn what the directory held when the writer opened it."""
        self.newest = max((r.episode_index for r in records), default=None)

    def committed(self, episode: int) -> None:
        """A commit of ``episode`` succeeded (retention never deletes the newest)."""
        if self.newest is None or episode > self.newest:
            self.newest = episode

    def check(self, episode: int, pending: Iterable[int],
              committed: Callable[[], Iterable[CheckpointRecord]]) -> None:
        """Raise unless ``episode`` is above everything committed or pending.

        Args:
            episode: the episode being submitted.
            pending: episodes submitted to this writer and not written yet.
            committed: the committed checkpoints (called only to word the error).

        Raises:
            CheckpointExistsError: ``episode`` is there, pending, or below the newest.
        """
        waiting = list(pending)
        newest = max([e for e in (self.newest, *waiting) if e is not None], default=None)
        if newest is None or episode > newest:
            return
        name = layout.checkpoint_name(episode)
        if any(r.name == name for r in committed()):
            reason = "exists"
        elif episode in waiting:
            reason = "pending"
        else:
            reason = "behind"
        raise CheckpointExistsError(episode, self.location, newest, reason)
