"""What ``resume_from`` names: a path, ``auto`` or ``best``, resolved to one checkpoint.

- a path: anything :func:`ckptwriter.load_checkpoint` accepts (a checkpoint,
  ``latest``, ``best``, a checkpoints or run directory, ``outputs/<run_name>``);
- ``auto``: the newest valid checkpoint of this run name's runs
  (``<output_dir>/<run_name>/<timestamp>/``, newest run first), continued in place: the
  run writes on into that run's checkpoints directory, so a job requeued after each
  preemption keeps one run directory, one retention window (``checkpoint_keep_last``
  bounds the disk use of the whole chain) and one ``top_k_val`` ranking. No checkpoint
  there: a fresh start;
- ``best``: the ``best`` checkpoint of the newest run of this run name that has one.

A run's checkpoints directory is the one its ``config.yaml`` records, an absolute one
too, so runs with ``checkpoint_dir: /scratch/ckpts`` are found from
``outputs/<run_name>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

from .. import layout
from ..config import RESUME_AUTO, Config
from ..errors import CheckpointError, CheckpointNotFoundError, MemoryTypeMismatchError
from ..reader import LoadedCheckpoint, list_checkpoints, load_checkpoint
from ..storage.location import parse_location

__all__ = ["RESUME_BEST", "find_resume", "run_checkpoint_dirs"]

log = logging.getLogger("ckptwriter.runtime")

RESUME_BEST = layout.BEST_LINK
_CONFIG_YAML = "config.yaml"


def find_resume(cfg: Config, *, entry_types: tuple[type, ...] = (),
                state_types: tuple[type, ...] = ()
                ) -> tuple[LoadedCheckpoint | None, Path | None]:
    """The checkpoint ``resume_from`` names, loaded, and the run directory to continue in.

    Args:
        cfg: the run's configuration.
        entry_types, state_types: the agent's own types (its hook's class attributes),
            which the checkpoint's memory, logs and state are loaded with.

    Returns:
        ``(None, None)`` without ``resume_from`` or under ``auto`` with nothing to
        resume; the run directory is set only under ``auto`` (continued in place).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError
        (ClassMismatchError: an entry or state class changed since; never a fallback).
    """
    want = cfg.runtime.resume_from
    if want is None:
        return None, None
    mtype = cfg.agent.memory_type
    load = partial(load_checkpoint, expected_memory_type=mtype, entry_types=entry_types,
                   state_types=state_types)
    runs_root = Path(cfg.output_dir) / cfg.name
    if want in (RESUME_AUTO, RESUME_BEST):
        for run, ckpts in run_checkpoint_dirs(runs_root):
            target = ckpts if want == RESUME_AUTO else f"{ckpts}/{layout.BEST_LINK}"
            try:
                loaded = load(target)
            except CheckpointNotFoundError:
                continue  # this run died before its first checkpoint (or has no best)
            if want == RESUME_AUTO:
                return _newest_committed(loaded, load), run
            return loaded, None
        if want == RESUME_BEST:
            raise CheckpointNotFoundError(
                str(runs_root), hint=f"resume_from: best needs a run of {cfg.name} with a "
                "best checkpoint (written under validation); name a checkpoint instead.")
        log.info("No checkpoint of run %s under %s: starting fresh (resume_from: auto)",
                 cfg.name, runs_root)
        return None, None
    try:
        loaded = load(want)
    except CheckpointNotFoundError:
        # outputs/<run_name> whose runs keep their checkpoints elsewhere (an absolute
        # checkpoint_dir): the reader only follows a run's relative checkpoints dir.
        for _run, ckpts in run_checkpoint_dirs(Path(want)):
            if not os.path.isabs(ckpts):
                continue
            try:
                return load(ckpts), None
            except CheckpointNotFoundError:
                continue
        raise
    base = Path(str(want).rstrip("/")).name
    named = (layout.parse_checkpoint_name(base) is not None
             or base in (layout.BEST_LINK, layout.BEST_JSON))
    # A checkpoint (or best) named by the user is what they asked for; latest may lag.
    return (loaded if named else _newest_committed(loaded, load)), None


def _newest_committed(loaded: LoadedCheckpoint, load: Callable[[str], LoadedCheckpoint]
                      ) -> LoadedCheckpoint:
    """The newest checkpoint of ``loaded``'s directory, when ``latest`` lagged behind it.

    A run killed between committing ``ep_M`` and moving ``latest`` leaves ``latest`` on an
    older ``ep_N``: ``ep_M`` is whole and durable, and is this history's newest state.
    Resuming from ``ep_N`` would lose its episodes and, in place, collide with ``ep_M``
    (the writer refuses existing steps). A higher episode committed *before* ``ep_N``
    (``replace=True`` going back) is another history and is left alone.
    """
    try:
        infos = list_checkpoints(loaded.path.parent)
    except CheckpointError:
        return loaded
    mine = loaded.runtime
    later = [i for i in infos if i.complete and i.runtime is not None
             and i.episode_index > mine.episode_index and i.runtime.timestamp >= mine.timestamp]
    for info in sorted(later, key=lambda i: i.episode_index, reverse=True):
        try:
            newer = load(str(info.path))
        except MemoryTypeMismatchError:
            # The agent's classes do not fit it (one changed since, say): resuming from
            # the older one would rerun its episodes and then collide with it.
            raise
        except CheckpointError as exc:
            log.warning("%s is newer than the pointer's %s but cannot be loaded (%s)",
                        info.name, loaded.path.name, exc)
            continue
        log.warning("latest names %s, but %s was committed after it and is whole (a run "
                    "stopped between committing it and moving latest): resuming from %s",
                    loaded.path.name, info.name, info.path)
        return newer
    return loaded


def run_checkpoint_dirs(runs_root: Path) -> list[tuple[Path, str]]:
    """``(run directory, its checkpoints directory)`` of ``outputs/<run_name>``, newest first.

    The checkpoints directory is what the run's ``config.yaml`` records (relative to the
    run directory, absolute, or a URL); runs without one (checkpointing off) are skipped.
    """
    try:
        names = [n for n in os.listdir(runs_root) if layout.RUN_DIR_RE.match(n)]
    except OSError:
        return []
    out: list[tuple[Path, str]] = []
    for name in sorted(names, key=layout.run_sort_key, reverse=True):
        run = runs_root / name
        ckpts = _recorded_dir(run)
        if ckpts is not None:
            out.append((run, ckpts))
    return out


def _recorded_dir(run: Path) -> str | None:
    try:
        doc = yaml.safe_load((run / _CONFIG_YAML).read_text(encoding="utf-8"))
        value = doc["runtime"]["checkpoint_dir"]
    except (OSError, yaml.YAMLError, UnicodeError, TypeError, KeyError):
        # No (readable) record: the default layout, if it is there.
        return str(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    if not isinstance(value, str) or not value:
        return None
    loc = parse_location(value)
    if not loc.is_local:
        return value
    return str(run / loc.path)  # an absolute path replaces the run directory
