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
from pathlib import Path

import yaml

from .. import layout
from ..config import RESUME_AUTO, Config
from ..errors import CheckpointNotFoundError
from ..reader import LoadedCheckpoint, load_checkpoint
from ..storage.location import parse_location

__all__ = ["RESUME_BEST", "find_resume", "run_checkpoint_dirs"]

log = logging.getLogger("ckptwriter.runtime")

RESUME_BEST = layout.BEST_LINK
_CONFIG_YAML = "config.yaml"


def find_resume(cfg: Config) -> tuple[LoadedCheckpoint | None, Path | None]:
    """The checkpoint ``resume_from`` names, loaded, and the run directory to continue in.

    Returns:
        ``(None, None)`` without ``resume_from`` or under ``auto`` with nothing to
        resume; the run directory is set only under ``auto`` (continued in place).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptError, MemoryTypeMismatchError.
    """
    want = cfg.runtime.resume_from
    if want is None:
        return None, None
    mtype = cfg.agent.memory_type
    runs_root = Path(cfg.output_dir) / cfg.name
    if want in (RESUME_AUTO, RESUME_BEST):
        for run, ckpts in run_checkpoint_dirs(runs_root):
            target = ckpts if want == RESUME_AUTO else f"{ckpts}/{layout.BEST_LINK}"
            try:
                loaded = load_checkpoint(target, expected_memory_type=mtype)
            except CheckpointNotFoundError:
                continue  # this run died before its first checkpoint (or has no best)
            return loaded, run if want == RESUME_AUTO else None
        if want == RESUME_BEST:
            raise CheckpointNotFoundError(
                str(runs_root), hint=f"resume_from: best needs a run of {cfg.name} with a "
                "best checkpoint (written under validation); name a checkpoint instead.")
        log.info("No checkpoint of run %s under %s: starting fresh (resume_from: auto)",
                 cfg.name, runs_root)
        return None, None
    try:
        return load_checkpoint(want, expected_memory_type=mtype), None
    except CheckpointNotFoundError:
        # outputs/<run_name> whose runs keep their checkpoints elsewhere (an absolute
        # checkpoint_dir): the reader only follows a run's relative checkpoints dir.
        for _run, ckpts in run_checkpoint_dirs(Path(want)):
            if not os.path.isabs(ckpts):
                continue
            try:
                return load_checkpoint(ckpts, expected_memory_type=mtype), None
            except CheckpointNotFoundError:
                continue
        raise


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
