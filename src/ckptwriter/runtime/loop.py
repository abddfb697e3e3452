"""The training loop: episodes, validation and checkpoints, from plan to result.

:func:`run_training` runs one configuration to the end (or to a signal):

1. resume (if ``resume_from``): the checkpoint is loaded and verified, its memory type
   checked, the memory restored, the episode and step counters set, and the task
   sequence advanced past episodes 1..N without running them;
2. a new run directory ``<output_dir>/<run_name>/<YYYYmmdd_HHMMSS>/`` gets the resolved
   ``config.yaml`` and the checkpoints directory (a resumed run never writes into the
   directory it resumed from);
3. episodes N+1..``max_envs_to_visit``, validation every ``validation_freq``,
   checkpoints every ``checkpoint_every_episodes`` (and after each validation under
   ``top_k_val``), and a final checkpoint unless the last episode was just saved.

Snapshots go to a :class:`~ckptwriter.CheckpointWriter`, so the loop pays an O(1)
capture per checkpoint and no per-episode I/O.

Data flow: :mod:`.plan` (step 1) -> :mod:`.run_dir` (step 2) -> the episodes here
(step 3); :mod:`.signals` turns SIGINT/SIGTERM/SIGHUP into a stop after the current
episode.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from .. import layout
from ..config import Config
from ..errors import CheckpointError, WriterFailedError
from ..gil import switch_interval
from ..handles import CheckpointHandle
from ..memory import Action, Feedback, Observation, Reflection
from ..snapshot import Snapshot
from ..stats import WriterStats
from ..storage.urlpath import URLPath
from ..writer import CheckpointWriter
from .environments import Task
from .plan import RunPlan, prepare_run
from .progress import UPDATE_SECONDS, NullReporter, Reporter, TrainStatus
from .run_dir import check_not_shared, effective_config, make_run_dir
from .signals import StopFlag, watch_signals

__all__ = ["TrainResult", "resume_hint", "run_training"]

log = logging.getLogger("ckptwriter.runtime")


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

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal that stopped the run (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
        return 128 + self.stopped_by if self.stopped_by else 0


async def run_training(
    cfg: Config,
    *,
    reporter: Reporter | None = None,
    handle_signals: bool = False,
    search_dirs: tuple[str, ...] | None = None,
) -> TrainResult:
    """Train one configuration to ``max_envs_to_visit`` (or until SIGINT/SIGTERM/SIGHUP).

    Args:
        cfg: a configuration from :func:`ckptwriter.config.load_config`.
        reporter: receives progress updates (the CLI's progress bar).
        handle_signals: on SIGINT/SIGTERM/SIGHUP finish the episode, write a final
            checkpoint and return with ``stopped_by`` set; a second signal exits the
            process at once. Only for the main thread of a program that owns its signals.
        search_dirs: where a ``module:Class`` agent may be found besides ``sys.path``.

    Returns:
        where the run and its checkpoints are and how it ended.

    Raises:
        ConfigError: the configuration cannot run (before any episode).
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError:
            ``resume_from`` cannot be used.
        WriterFailedError: a checkpoint failed to write (``on_error: raise``).

    Error handling:
        An error raised once training has begun (a failed checkpoint, the agent's own
        exception) carries a note (``__notes__``, see :func:`resume_hint`) naming the
        last durable checkpoint and the ``resume_from`` that continues from it.
    """
    plan = prepare_run(cfg, search_dirs)
    check_not_shared(cfg, plan)
    run_dir, ckpt_dir = make_run_dir(effective_config(cfg, plan))
    log.info("Run directory: %s", run_dir)
    if plan.resumed is not None:
        log.info("Resuming from episode %d (checkpoint %s)",
                 plan.first_episode, plan.resumed.path)
        if plan.resumed.agent.agent_type != cfg.agent.type:
            # Allowed (runtime settings may differ on resume), but rarely meant.
            log.warning("The checkpoint was written by agent %s; continuing with agent %s",
                        plan.resumed.agent.agent_type, cfg.agent.type)
    stop = StopFlag()
    failure: Exception | None = None
    trainer = _Trainer(plan, run_dir, ckpt_dir, stop, reporter or NullReporter())
    async with anyio.create_task_group() as tg:
        if handle_signals:
            await tg.start(watch_signals, stop)
        try:
            # A writer thread (executor: thread, object storage) needs the GIL for each
            # step of a commit. This loop is CPU-bound and rarely blocks, so at CPython's
            # default 5 ms switch interval every GIL hand-off to the writer can cost 5 ms
            # and a checkpoint lags by seconds (then backpressure stalls the loop). 0.5 ms
            # keeps the writer prompt; it costs the loop about 10 % when checkpointing
            # every episode with a thread (docs/PERFORMANCE.md), nothing measurable with
            # the default writer process, which has its own GIL. The library never
            # changes this interpreter-wide setting itself; the runtime owns the process
            # and opts in for the duration of training.
            with switch_interval():
                result = await trainer.run()
        except Exception as exc:
            # Re-raised outside the task group, so callers get the error itself rather
            # than an ExceptionGroup around it (cancellation still propagates as is).
            failure = _unwrap(exc)
            if ckpt_dir is not None:
                _add_note(failure, resume_hint(trainer.durable()))
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


def resume_hint(checkpoint: Path | None) -> str:
    """The line that says where a run that ended early can continue from."""
    if checkpoint is None:
        return "no checkpoint was written: there is nothing to resume from"
    return (f"the last durable checkpoint is {checkpoint}; to continue from it, set "
            f"runtime.resume_from: {checkpoint}")


def _add_note(exc: BaseException, note: str) -> None:
    # BaseException.add_note is 3.11+; tracebacks print __notes__ from 3.11 on, and the
    # command line prints them itself.
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes.append(note)
    else:
        exc.__notes__ = [note]  # type: ignore[attr-defined]


def _resumes_in_place(plan: RunPlan, ckpt_dir: Path | None) -> bool:
    """True if the run writes into the checkpoints directory it resumed from."""
    if plan.resumed is None or ckpt_dir is None:
        return False
    src = plan.resumed.path.parent
    if isinstance(src, URLPath) or isinstance(ckpt_dir, URLPath):
        return str(src).rstrip("/") == str(ckpt_dir).rstrip("/")
    try:
        return os.path.samefile(src, ckpt_dir)
    except OSError:
        return False


def _unwrap(exc: Exception) -> Exception:
    # The writer's own task group may wrap a single error in an ExceptionGroup.
    while True:
        inner = getattr(exc, "exceptions", None)
        if not isinstance(inner, tuple) or len(inner) != 1 or not isinstance(inner[0], Exception):
            return exc
        exc = inner[0]


class _Trainer:
    def __init__(self, plan: RunPlan, run_dir: Path, ckpt_dir: Path | None, stop: StopFlag,
                 reporter: Reporter) -> None:
        self.plan = plan
        self.cfg = plan.cfg
        self.rt = plan.cfg.runtime
        self.agent = plan.agent
        self.memory = plan.memory
        self.run_dir = run_dir
        self.ckpt_dir = ckpt_dir
        self.stop = stop
        self.reporter = reporter
        self.steps = plan.train_steps
        self.episode = plan.first_episode
        self.val_score: float | None = None
        self.saved_episode: int | None = None
        self.latest: str | None = None
        self.written = 0
        self.pending: list[CheckpointHandle] = []
        self.writer: CheckpointWriter | None = None
        # runtime.json is JSON: a path that is not UTF-8 is recorded as its file: URI.
        self.resumed_from = (layout.path_text(str(plan.resumed.path.resolve()))
                             if plan.resumed else None)
        self.in_place = _resumes_in_place(plan, ckpt_dir)
        self.agent_config: dict[str, Any] = dict(plan.agent.config)
        self._t_start = time.perf_counter()

    def durable(self) -> Path | None:
        """The newest checkpoint known durable: this run's last, or the one it resumed from.

        What the writer acknowledged, still there: a local checkpoint deleted behind the
        writer's back (the fault that may have ended the run) is not offered.
        """
        candidates: list[Path] = []
        if self.writer is not None and self.ckpt_dir is not None:
            candidates += [self.ckpt_dir / r.name for r in reversed(self.writer.checkpoints)]
        if self.plan.resumed is not None:
            candidates.append(self.plan.resumed.path)
        for path in candidates:
            if isinstance(path, URLPath) or path.is_dir():
                return path
        return None

    async def run(self) -> TrainResult:
        t0 = time.perf_counter()
        stats: WriterStats | None = None
        if self.ckpt_dir is None:
            log.info("Checkpointing is off (runtime.checkpoint_dir: null)")
            await self._train()
        else:
            async with CheckpointWriter(
                self.ckpt_dir, **self.rt.writer_options().writer_kwargs()
            ) as writer:
                self.writer = writer
                await self._train()
                await writer.flush()
                await self._collect(wait=True)
                stats = writer.stats
                self._report()
        return TrainResult(
            run_dir=self.run_dir, checkpoint_dir=self.ckpt_dir,
            first_episode=self.plan.first_episode, last_episode=self.episode,
            target_episode=self.plan.target_episode, train_steps_total=self.steps,
            val_score=self.val_score, latest_checkpoint=self.latest,
            checkpoints_written=self.written, resumed_from=self.resumed_from,
            stopped_by=self.stop.signum, elapsed_seconds=time.perf_counter() - t0,
            writer_stats=stats, durable_checkpoint=self.durable(),
        )

    async def _train(self) -> None:
        rt, plan = self.rt, self.plan
        first, target = plan.first_episode, plan.target_episode
        every, vfreq = rt.checkpoint_every_episodes, rt.validation_freq
        top_k = rt.checkpoint_strategy == "top_k_val"
        start_val: float | None = None
        if rt.run_validation_at_start:
            start_val = await self._validate(first)
        if self.in_place:
            # Continuing a run in its own directory: episode `first` is the checkpoint
            # just resumed from, already there. Committing it again would only replace
            # it with itself (and for a moment leave readers of `latest` without it).
            self.saved_episode = first
        elif rt.checkpoint_on_start or (top_k and start_val is not None):
            await self._save(first, start_val)
        self._t_start = time.perf_counter()
        next_report = 0.0
        val: float | None = start_val
        for ep in range(first + 1, target + 1):
            await self._run_episode(next(plan.sequence))
            self.episode = ep
            val = None
            if vfreq is not None and ep % vfreq == 0:
                val = await self._validate(ep)
            if (every is not None and ep % every == 0) or (top_k and val is not None):
                await self._save(ep, val)
            if self.pending:
                await self._collect(wait=False)
            now = time.perf_counter()
            if now >= next_report:
                next_report = now + UPDATE_SECONDS
                self._report(now)
            # Yield once per episode: the writer task and the signal watcher run here.
            await anyio.lowlevel.checkpoint()
            if self.stop.signum is not None:
                log.warning("Stopped by %s after episode %d",
                            signal.Signals(self.stop.signum).name, ep)
                break
        if self.writer is not None and self.saved_episode != self.episode:
            await self._save(self.episode, val if self.episode != first else start_val)
        self._report()

    async def _run_episode(self, task: Task) -> None:
        append, agent = self.memory.append, self.agent
        for _ in range(self.cfg.environment.max_attempts):
            append(Observation(content=task.question))
            action = await agent.act(task.question)
            if not isinstance(action, str):
                raise CheckpointError(
                    f"{type(agent).__name__}.act returned {type(action).__name__}, "
                    "expected str (see ckptwriter.runtime.Agent)"
                )
            append(Action(content=action))
            feedback = task.grade(action)
            append(Feedback(content=feedback))
            await agent.observe(feedback)
            reflection = await agent.reflect()
            if reflection:
                append(Reflection(content=reflection))
            self.steps += 1
            if feedback.score >= 1.0:
                return

    async def _validate(self, episode: int) -> float:
        tasks = self.plan.validation
        correct = 0.0
        for task in tasks:
            correct += task.grade(await self.agent.act(task.question)).score
        score = correct / len(tasks)
        self.val_score = score
        log.info("Validation at episode %d: val_score=%.3f (%d/%d correct)",
                 episode, score, int(correct), len(tasks))
        return score

    async def _save(self, episode: int, val_score: float | None) -> None:
        if self.writer is None:
            return
        handle = await self.writer.submit(Snapshot(
            episode_index=episode,
            train_steps_total=self.steps,
            agent_type=self.cfg.agent.type,
            memory=self.memory,
            agent_config=self.agent_config,
            memory_type=self.cfg.agent.memory_type,
            val_score=val_score,
            resumed_from=self.resumed_from,
        ))
        self.saved_episode = episode
        self.pending.append(handle)

    async def _collect(self, *, wait: bool) -> None:
        still: list[CheckpointHandle] = []
        for handle in self.pending:
            if not wait and not handle.done():
                still.append(handle)
                continue
            try:
                res = await handle.wait()
            except WriterFailedError as exc:
                if self.rt.on_error == "raise":
                    raise
                log.warning("Checkpoint for episode %d failed: %s", handle.episode_index, exc)
                continue
            if handle.coalesced:
                # on_backlog: coalesce replaced this snapshot by a newer one, which
                # reports the write itself.
                log.debug("Checkpoint for episode %d coalesced into %s",
                          handle.episode_index, res.name)
                continue
            self.written += 1
            self.latest = res.name
            deleted = f", deleted {', '.join(res.deleted)}" if res.deleted else ""
            log.info("Checkpoint %s saved: %s, %.1f KiB in %.1f ms%s",
                     res.name, res.path, res.bytes_written / 1024,
                     res.latency_seconds * 1000, deleted)
        self.pending = still

    def _report(self, now: float | None = None) -> None:
        elapsed = (now or time.perf_counter()) - self._t_start
        done = self.episode - self.plan.first_episode
        self.reporter.update(TrainStatus(
            episode=self.episode,
            first_episode=self.plan.first_episode,
            last_episode=self.plan.target_episode,
            episodes_per_second=done / elapsed if elapsed > 0 else 0.0,
            last_checkpoint=self.latest,
            pending_writes=len(self.pending),
            val_score=self.val_score,
        ))
