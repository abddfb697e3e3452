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
    "KeepLastN",
    "KeepTopKByScore",
    "RetentionPolicy",
    "Strategy",
    "make_policy",
    "select_for_deletion",
]

Strategy = Literal["all", "last_n", "top_k_val"]

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
    """Keep the ``k`` best by ``val_score``; ties go to the newer; unscored rank last."""

    k: int

    def should_preserve(self, checkpoints: Sequence[CheckpointRecord]) -> list[bool]:
        def rank(i: int) -> tuple[bool, float, int]:
            s = checkpoints[i].val_score
            return (s is not None, s if s is not None else 0.0, checkpoints[i].episode_index)

        best = set(sorted(range(len(checkpoints)), key=rank, reverse=True)[: self.k])
        return [i in best for i in range(len(checkpoints))]


def make_policy(strategy: str | None, keep_last: int | None) -> RetentionPolicy:
    """Build the policy the guide describes from its two settings.

    ``strategy`` defaults to ``all`` without ``keep_last`` and to ``last_n`` with it;
    ``top_k_val`` without ``keep_last`` keeps the :data:`DEFAULT_TOP_K` best.

    Raises:
        ConfigError: the combination is invalid (the message says how to fix it).
    """
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
        return KeepTopKByScore(DEFAULT_TOP_K if keep_last is None else keep_last)
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
