"""How a run that ends early or with failures says so: the resume line, notes, summary.

A run stopped by a signal, by an error of the agent or environment, or by a failed
checkpoint names the last durable checkpoint and the ``resume_from`` that continues from
it (:func:`resume_hint`); a run that completed with failed checkpoints
(``on_error: warn``) counts them in its summary (:func:`failure_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..stats import WriterStats
from .plan import RunPlan
from .state_hook import memory_up_to as memory_up_to

__all__ = ["TrainResult", "add_note", "failure_summary", "interval_warning", "memory_up_to",
           "nothing_to_do", "resume_hint", "unwrap"]


@dataclass(frozen=True)
class TrainResult:
    """How a run ended and where its checkpoints are."""

    run_dir: Path
    checkpoint_dir: Path | None
    first_episode: int
    last_episode: int
    target_episode: int
    train_steps_total: int
    val_score: float | None
    latest_checkpoint: str | None
    checkpoints_written: int
    resumed_from: str | None
    stopped_by: int | None
    elapsed_seconds: float
    writer_stats: WriterStats | None
    # The newest checkpoint known durable: this run's last, else the one it resumed from.
    durable_checkpoint: Path | None = None
    # Checkpoints that failed to write (on_error: warn; under raise the run raised).
    checkpoints_failed: int = 0

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal that stopped the run (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
        return 128 + self.stopped_by if self.stopped_by else 0


def nothing_to_do(plan: RunPlan) -> TrainResult:
    """The result of an auto-resumed run found already at its last episode."""
    assert plan.resumed is not None
    path = plan.resumed.path
    return TrainResult(
        run_dir=plan.continue_in or path.parent.parent, checkpoint_dir=path.parent,
        first_episode=plan.first_episode, last_episode=plan.first_episode,
        target_episode=plan.target_episode, train_steps_total=plan.train_steps,
        val_score=plan.resumed.runtime.val_score, latest_checkpoint=path.name,
        checkpoints_written=0, resumed_from=str(path), stopped_by=None, elapsed_seconds=0.0,
        writer_stats=None, durable_checkpoint=path,
    )


def interval_warning(cfg: Config) -> str | None:
    """What to say at start when only the final checkpoint will be written, if so."""
    rt = cfg.runtime
    if (rt.checkpoint_every_episodes is not None or rt.checkpoint_every_seconds is not None
            or rt.checkpoint_strategy == "top_k_val"):
        return None
    return ("No checkpoint interval is set: only the final checkpoint will be written; set "
            "checkpoint_every_episodes (e.g. 100) or checkpoint_every_seconds (e.g. 600) to "
            "checkpoint during the run")


def resume_hint(checkpoint: Path | None, *, auto: bool = False) -> str:
    """The line that says where a run that ended early can continue from (under
    ``resume_from: auto``: the same command, which continues in place)."""
    if checkpoint is None:
        return "no checkpoint was written: there is nothing to resume from"
    if auto:
        # Naming the checkpoint would start a new run directory: the chain auto keeps
        # (one run, its retention) would break.
        return (f"the last durable checkpoint is {checkpoint}; to continue from it, run "
                "the same command again (resume_from: auto continues in place)")
    return (f"the last durable checkpoint is {checkpoint}; to continue from it, set "
            f"runtime.resume_from: {checkpoint}")


def failure_summary(failed: int, durable: Path | None) -> str | None:
    """The summary line for checkpoints that failed under ``on_error: warn``, if any."""
    if failed == 0:
        return None
    last = "none was written" if durable is None else f"the last durable one is {durable}"
    return (f"{failed} checkpoint(s) failed to write (on_error: warn; the warnings above "
            f"say why); {last}")


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (``__notes__``; tracebacks print them from 3.11 on)."""
    # BaseException.add_note is 3.11+; the command line prints notes itself before that.
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes.append(note)
    else:
        exc.__notes__ = [note]  # type: ignore[attr-defined]


def unwrap(exc: Exception) -> Exception:
    """The one error inside nested single-error ExceptionGroups (the writer's task group)."""
    while True:
        inner = getattr(exc, "exceptions", None)
        if not isinstance(inner, tuple) or len(inner) != 1 or not isinstance(inner[0], Exception):
            return exc
        exc = inner[0]
