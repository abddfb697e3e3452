"""The training loop: episodes, validation and checkpoints, from plan to result.

:func:`run_training` runs one configuration to the end (or to a signal):

1. resume (if ``resume_from``): the checkpoint is loaded and verified, its memory type
   checked, the memory restored, the episode and step counters set, and the task
   sequence advanced past episodes 1..N without running them;
2. a new run directory ``<output_dir>/<run_name>/<YYYYmmdd_HHMMSS>/`` gets the resolved
   ``config.yaml`` and the checkpoints directory (a resumed run never writes into the
   directory it resumed from, except under ``resume_from: auto``, which continues the
   run it resumed in place);
3. episodes N+1..``max_envs_to_visit``, validation every ``validation_freq``,
   checkpoints every ``checkpoint_every_episodes`` or ``checkpoint_every_seconds``
   (whichever comes first; and after each validation under ``top_k_val``), and a final
   checkpoint unless the last episode was just saved. If the agent or the environment
   raises, the last completed episode is checkpointed first
   (``checkpoint_on_exception``).

Snapshots go to a :class:`~ckptwriter.CheckpointWriter`, so the loop pays an O(1)
capture per checkpoint and no per-episode I/O.

Data flow: :mod:`.plan` (step 1) -> :mod:`.run_dir` (step 2) -> the episodes here
(step 3); :mod:`.signals` turns SIGINT/SIGTERM/SIGHUP into a stop after the current
episode.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from .. import layout
from ..config import Config
from ..errors import CheckpointError, WriterFailedError
from ..gil import switch_interval
from ..handles import CheckpointHandle
from ..memory import Action, Feedback, MemoryLog, Observation, Reflection
from ..snapshot import Snapshot
from ..stats import WriterStats
from ..storage.urlpath import URLPath
from ..writer import CheckpointWriter
from .endings import (
    TrainResult,
    add_note,
    failure_summary,
    interval_warning,
    nothing_to_do,
    resume_hint,
    unwrap,
)
from .environments import Task
from .plan import RunPlan, prepare_run
from .progress import UPDATE_SECONDS, NullReporter, Reporter, TrainStatus, display_path
from .run_dir import (
    check_not_shared,
    continue_run_dir,
    effective_config,
    make_run_dir,
    record_config,
    resumes_in_place,
)
from .signals import StopFlag, watch_signals
from .state_hook import AgentHook, EpisodeMark, episode_mark, memory_up_to, snapshot_parts

__all__ = ["TrainResult", "failure_summary", "resume_hint", "run_training"]

log = logging.getLogger("ckptwriter.runtime")


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
    if plan.complete:
        return nothing_to_do(plan)
    check_not_shared(cfg, plan)
    record: Config | None = None
    if plan.continue_in is not None:
        run_dir, in_place_dir, record = continue_run_dir(effective_config(cfg, plan), plan)
        ckpt_dir: Path | None = in_place_dir
        log.info("Continuing run directory %s in place (resume_from: auto)",
                 display_path(run_dir))
    else:
        run_dir, ckpt_dir = make_run_dir(effective_config(cfg, plan))
        log.info("Run directory: %s", display_path(run_dir))
    if ckpt_dir is not None and (no_interval := interval_warning(cfg)):
        log.warning("%s", no_interval)
    if plan.resumed is not None:
        log.info("Resuming from episode %d (checkpoint %s)",
                 plan.first_episode, display_path(plan.resumed.path))
        if plan.resumed.agent.agent_type != cfg.agent.type:
            # Allowed (runtime settings may differ on resume), but rarely meant.
            log.warning("The checkpoint was written by agent %s; continuing with agent %s",
                        plan.resumed.agent.agent_type, cfg.agent.type)
    stop = StopFlag()
    failure: Exception | None = None
    trainer = _Trainer(plan, run_dir, ckpt_dir, stop, reporter or NullReporter())
    if record is not None:
        # Replaced once the writer holds the directory's lock: a run refused because
        # another one is writing there leaves that run's record alone.
        trainer.on_open = lambda: record_config(record, run_dir)
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
            failure = unwrap(exc)
            if ckpt_dir is not None and trainer.writer is None and record is None:
                # Refused before the writer opened (DirectoryLockedError: another run
                # writes there): no run directory of a run that never ran is left.
                shutil.rmtree(run_dir, ignore_errors=True)
            elif ckpt_dir is not None:
                add_note(failure, resume_hint(trainer.durable(),
                                              auto=cfg.runtime.resume_from == "auto"))
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


class _Trainer:
    def __init__(self, plan: RunPlan, run_dir: Path, ckpt_dir: Path | None, stop: StopFlag,
                 reporter: Reporter) -> None:
        self.plan = plan
        self.cfg = plan.cfg
        self.rt = plan.cfg.runtime
        self.agent = plan.agent
        self.memory = plan.memory
        self.hook = plan.hook or AgentHook(plan.cfg.agent.type)
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
        self.in_place = resumes_in_place(plan, ckpt_dir)
        self.agent_config: dict[str, Any] = dict(plan.agent.config)
        self._t_start = time.perf_counter()
        self.failed = 0
        self.on_open: Any = None
        # The end of the last completed episode (episode, memory length, steps, logs and
        # state): what checkpoint_on_exception saves when the agent raises mid-episode.
        self._marking = (self.rt.checkpoint_on_exception and self.hook.stateful
                         and ckpt_dir is not None)
        self._completed = (plan.first_episode, len(plan.memory), plan.train_steps, self._mark())
        self._saved_at = time.monotonic()

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
                if self.on_open is not None:
                    self.on_open()
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
            checkpoints_failed=self.failed,
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
        every_s = rt.checkpoint_every_seconds
        self._saved_at = time.monotonic()
        for ep in range(first + 1, target + 1):
            try:
                await self._run_episode(next(plan.sequence))
                self.episode = ep
                self._completed = (ep, len(self.memory), self.steps, self._mark())
                val = None
                if vfreq is not None and ep % vfreq == 0:
                    val = await self._validate(ep)
            except Exception as exc:
                await self._save_on_exception(exc)
                raise
            # A monotonic clock: a wall clock stepped back (NTP) must not stop checkpoints.
            if ((every is not None and ep % every == 0) or (top_k and val is not None)
                    or (every_s is not None and time.monotonic() - self._saved_at >= every_s)):
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
        if self.pending:
            # Saves already durable are logged first: lines stay in the order things happened.
            await self._collect(wait=False)
        tasks = self.plan.validation
        correct = 0.0
        for task in tasks:
            correct += task.grade(await self.agent.act(task.question)).score
        score = correct / len(tasks)
        self.val_score = score
        log.info("Validation at episode %d: val_score=%.3f (%d/%d correct)",
                 episode, score, int(correct), len(tasks))
        return score

    def _mark(self) -> EpisodeMark | None:
        return episode_mark(self.agent, self.hook) if self._marking else None

    async def _save(self, episode: int, val_score: float | None,
                    at: tuple[MemoryLog, int, EpisodeMark | None] | None = None) -> None:
        if self.writer is None:
            return
        memory, steps, mark = at or (self.memory, self.steps, None)
        handle = await self.writer.submit(Snapshot(
            episode_index=episode,
            train_steps_total=steps,
            agent_type=self.cfg.agent.type,
            memory=memory,
            agent_config=self.agent_config,
            memory_type=self.cfg.agent.memory_type,
            val_score=val_score,
            resumed_from=self.resumed_from,
            **snapshot_parts(self.agent, self.hook, mark),
        ))
        self.saved_episode = episode
        self._saved_at = time.monotonic()
        self.pending.append(handle)

    async def _save_on_exception(self, exc: Exception) -> None:
        """Checkpoint the last completed episode before ``exc`` ends the run.

        The failed episode's entries are left out, so resuming from this checkpoint runs
        that episode again from its start, as an uninterrupted run would.
        """
        episode, length, steps, mark = self._completed
        # Nothing completed since the start (or the resumed checkpoint): nothing to add.
        if (self.writer is None or not self.rt.checkpoint_on_exception
                or episode in (self.saved_episode, self.plan.first_episode)):
            return
        log.info("%s raised during episode %d: checkpointing episode %d before exiting",
                 type(exc).__name__, episode + 1, episode)
        try:
            await self._save(episode, None, (memory_up_to(self.memory, length), steps, mark))
            await self._collect(wait=True)
        except CheckpointError as err:
            log.warning("The checkpoint of episode %d failed too: %s", episode, err)

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
                self.failed += 1
                # The writer logs each failure it sees (once is enough); not one that was
                # a WriterFailedError already (a writer that has itself failed).
                level = (logging.WARNING if isinstance(exc.__cause__, WriterFailedError)
                         else logging.DEBUG)
                log.log(level, "Checkpoint for episode %d failed: %s", handle.episode_index, exc)
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
            # Logged when durable, so in time order with the other lines: a write that
            # ran in the background while later episodes (and their validation lines)
            # went by says when it became durable.
            late = (f" (durable by episode {self.episode})"
                    if self.episode > handle.episode_index else "")
            log.info("Checkpoint %s saved%s: %s, %.1f KiB in %.1f ms%s",
                     res.name, late, display_path(res.path), res.bytes_written / 1024,
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
            val_score=self.val_score,
            # The writer's count (queued + writing), not self.pending: handles done but
            # not yet logged are not the user's max_pending.
            writer_pending=self.writer.stats.pending if self.writer else 0,
            max_pending=self.rt.max_pending,
        ))
