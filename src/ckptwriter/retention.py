"""Which checkpoints to keep: pure policies, checkpoints in, decisions out.

Each policy answers ``should_preserve(checkpoints) -> list[bool]`` for checkpoints
ordered oldest to newest. :func:`select_for_deletion` adds the rules every strategy
obeys: the newest (``latest``) and protected checkpoints are never deleted.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .errors import ConfigError

__all__ = [
    "DEFAULT_TOP_K",
    "CheckpointRecord",
    "KeepAll",
    "KeepEvery",
    "KeepLastN",
    "KeepTopKByScore",
    "Mode",
    "RetentionPolicy",
    "Strategy",
    "make_policy",
    "select_for_deletion",
]

Strategy = Literal["all", "last_n", "top_k_val"]
# Whether a higher (max) or a lower (min) validation score is better.
Mode = Literal["max", "min"]

# K for top_k_val without keep_last. The guide's "Validation scores not tracked" fix sets
# top_k_val and no K, and must run as written; 3 is its own top-k example and its
# "Minimum: 3" advice. The library and the YAML both get it from here.
DEFAULT_TOP_K = 3


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """What retention knows about a committed checkpoint."""

    name: str
    episode_index: int
    val_score: float | None = None


class RetentionPolicy(Protocol):
    """Decides, for checkpoints oldest to newest, which ones to keep."""

    def should_preserve(self, checkpoints: Sequence[CheckpointRecord]) -> list[bool]: ...


@dataclass(frozen=True, slots=True)
class KeepAll:
    """Never delete anything (the default)."""

    def should_preserve(self, checkpoints: Sequence[CheckpointRecord]) -> list[bool]:
        return [True] * len(checkpoints)


@dataclass(frozen=True, slots=True)
class KeepLastN:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def should_preserve(self, checkpoints: Sequence[CheckpointRecord]) -> list[bool]:
        cut = len(checkpoints) - self.n
        return [i >= cut for i in range(len(checkpoints))]


@dataclass(frozen=True, slots=True)
class KeepTopKByScore:
    """Keep the ``k`` best by ``val_score``; ties go to the newer; unscored rank last.

    ``mode="max"``: a higher score is better; ``mode="min"``: a lower one (a loss).
    """

    k: int
    mode: Mode = "max"

    def should_preserve(self, checkpoints: Sequence[CheckpointRecord]) -> list[bool]:
        sign = 1.0 if self.mode == "max" else -1.0

        def rank(i: int) -> tuple[bool, float, int]:
            s = checkpoints[i].val_score
            return (s is not None, sign * s if s is not None else 0.0,
                    checkpoints[i].episode_index)

        best = set(sorted(range(len(checkpoints)), key=rank, reverse=True)[: self.k])
        return [i in best for i in range(len(checkpoints))]


@dataclass(frozen=True, slots=True)
class KeepEvery:
    """``policy``, plus every checkpoint whose episode is a multiple of ``every``, forever.

    Orbax's ``keep_period``: milestones survive ``last_n`` and ``top_k_val``.
    """

    policy: RetentionPolicy
    every: int

    def should_preserve(self, checkpoints: Sequence[CheckpointRecord]) -> list[bool]:
        keep = self.policy.should_preserve(checkpoints)
        return [k or c.episode_index % self.every == 0
                for k, c in zip(keep, checkpoints, strict=True)]


def make_policy(
    strategy: str | None,
    keep_last: int | None,
    *,
    mode: str = "max",
    keep_every: int | None = None,
) -> RetentionPolicy:
    """Build the policy the guide describes from its settings.

    ``strategy`` defaults to ``all`` without ``keep_last`` and to ``last_n`` with it;
    ``top_k_val`` without ``keep_last`` keeps the :data:`DEFAULT_TOP_K` best, best by
    ``mode`` (``max`` or ``min``). With ``keep_every`` N, checkpoints whose episode is a
    multiple of N are never deleted.

    Raises:
        ConfigError: the combination is invalid (the message says how to fix it).
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"checkpoint_mode must be 'max' or 'min', got {mode!r}")
    if keep_every is not None and (
        isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every <= 0
    ):
        raise ConfigError(
            f"checkpoint_keep_every must be an int > 0, got {keep_every!r}; e.g. "
            "checkpoint_keep_every: 1000 keeps episodes 1000, 2000, ... forever"
        )
    policy = _base_policy(strategy, keep_last, "max" if mode == "max" else "min")
    if keep_every is None or isinstance(policy, KeepAll):
        return policy
    return KeepEvery(policy, keep_every)


def _base_policy(strategy: str | None, keep_last: int | None, mode: Mode) -> RetentionPolicy:
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last <= 0
    ):
        raise ConfigError(
            f"checkpoint_keep_last must be > 0, got {keep_last!r}; "
            "remove it to keep every checkpoint"
        )
    if strategy is None:
        strategy = "all" if keep_last is None else "last_n"
    if strategy == "all":
        if keep_last is not None:
            # The guide's "Old checkpoints not deleted": a keep_last that would do nothing.
            raise ConfigError(
                f"checkpoint_strategy all keeps every checkpoint, so checkpoint_keep_last: "
                f"{keep_last} would be ignored; set checkpoint_strategy: last_n to keep only "
                f"the newest {keep_last}, or remove checkpoint_keep_last"
            )
        return KeepAll()
    if strategy == "last_n":
        if keep_last is None:
            raise ConfigError(
                "checkpoint_strategy last_n needs checkpoint_keep_last (how many to keep), "
                "e.g. checkpoint_keep_last: 5"
            )
        return KeepLastN(keep_last)
    if strategy == "top_k_val":
        return KeepTopKByScore(DEFAULT_TOP_K if keep_last is None else keep_last, mode)
    raise ConfigError(
        f"unknown checkpoint_strategy {strategy!r}; expected one of: all, last_n, top_k_val"
    )


def select_for_deletion(
    checkpoints: Sequence[CheckpointRecord],
    policy: RetentionPolicy,
    *,
    protected: Collection[str] = (),
) -> list[str]:
    """Names to delete, oldest first. Never the newest checkpoint, never a protected one."""
    ordered = sorted(checkpoints, key=lambda c: c.episode_index)
    keep = policy.should_preserve(ordered)
    if ordered:
        keep[-1] = True
    return [c.name for c, k in zip(ordered, keep, strict=True) if not k and c.name not in protected]
