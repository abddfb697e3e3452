"""The run directory: ``<output_dir>/<run_name>/<YYYYmmdd_HHMMSS>/`` and its contents.

Step 2 of :func:`~ckptwriter.runtime.run_training`: refuse a ``checkpoint_dir`` that
holds another history, then create the run directory with the resolved ``config.yaml``
and the checkpoints directory. A resumed run never writes into the directory it resumed
from unless it continues that run in place (``resume_from: auto``, or an absolute
``checkpoint_dir`` that is the resumed checkpoint's own directory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import layout
from ..config import Config, dump_config
from ..errors import ConfigError
from ..reader import list_checkpoints
from ..storage.location import parse_location
from ..storage.urlpath import URLPath
from .plan import RunPlan

__all__ = ["check_not_shared", "continue_run_dir", "effective_config", "make_run_dir",
           "record_config", "resumes_in_place"]


def check_not_shared(cfg: Config, plan: RunPlan) -> None:
    """Refuse a checkpoint_dir that holds another history's checkpoints.

    Retention ranks checkpoints by episode, so a run writing among a previous run's
    higher episodes would see its own checkpoints deleted and ``latest`` move back.
    Continuing a run in place (resuming from its own newest checkpoint) is fine.
    """
    loc = None if cfg.runtime.checkpoint_dir is None else parse_location(
        cfg.runtime.checkpoint_dir)
    if loc is None or not loc.is_local or not os.path.isabs(loc.path):
        return  # relative: inside this run's own, new, run directory
    d = loc.path
    existing = list_checkpoints(d)
    if not existing:
        return
    newest = existing[-1]
    span = f"{existing[0].name} .. {newest.name}" if len(existing) > 1 else newest.name
    resumed = plan.resumed
    if (resumed is not None and parse_location(resumed.path).is_local
            and os.path.samefile(resumed.path.parent, d)):
        if newest.episode_index > plan.first_episode:
            raise ConfigError(
                f"{cfg.source}: runtime.checkpoint_dir {d} holds {newest.name}, later than "
                f"the checkpoint you resume from ({resumed.path.name}): writing there would "
                "mix two histories (retention would delete the new checkpoints and latest "
                "would move back). Remove runtime.checkpoint_dir to write into the new run "
                "directory, or resume from its latest"
            )
        return
    raise ConfigError(
        f"{cfg.source}: runtime.checkpoint_dir {d} already holds checkpoints of another run "
        f"({span}); each run needs its own checkpoints directory, or retention would delete "
        "this run's checkpoints and latest would move back. Remove runtime.checkpoint_dir "
        "(each run then writes into its own run directory), point it at an empty directory, "
        f"or continue that run with runtime.resume_from: {Path(d) / 'latest'}"
    )


def effective_config(cfg: Config, plan: RunPlan) -> Config:
    """The config with the defaults this run applied filled in, as config.yaml records it."""
    rt = cfg.runtime
    strategy = rt.checkpoint_strategy
    if strategy is None and rt.checkpoint_dir is not None:
        strategy = "all" if rt.checkpoint_keep_last is None else "last_n"
    runtime = rt.model_copy(update={
        "max_envs_to_visit": plan.target_episode, "checkpoint_strategy": strategy,
    })
    return cfg.model_copy(update={"runtime": runtime})


def resumes_in_place(plan: RunPlan, ckpt_dir: Path | None) -> bool:
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


def continue_run_dir(cfg: Config, plan: RunPlan) -> tuple[Path, Path, Config]:
    """The run directory and checkpoints directory an auto-resumed run continues in.

    Returns:
        the run directory, its checkpoints directory (the resumed checkpoint's) and the
        config to record there, whose ``checkpoint_dir`` names that directory.
    """
    assert plan.continue_in is not None
    assert plan.resumed is not None
    run_dir, ckpt_dir = plan.continue_in, plan.resumed.path.parent
    recorded: str = str(ckpt_dir)
    if not isinstance(ckpt_dir, URLPath):
        try:
            recorded = str(ckpt_dir.relative_to(run_dir))
        except ValueError:
            recorded = str(ckpt_dir.resolve())
    rt = cfg.runtime.model_copy(update={"checkpoint_dir": recorded})
    return run_dir, ckpt_dir, cfg.model_copy(update={"runtime": rt})


def record_config(cfg: Config, run_dir: Path) -> None:
    """Replace ``config.yaml`` of a run continued in place (whole, never half written)."""
    tmp = run_dir / f".config.yaml.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o664)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "config.yaml")


def make_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """Create the run directory with its ``config.yaml`` and checkpoints directory.

    Args:
        cfg: the configuration to record (see :func:`effective_config`).

    Returns:
        the run directory, and the checkpoints directory (``None`` when checkpointing
        is off; an object-storage URL is returned as a path without being created).

    Raises:
        ConfigError: ``output_dir`` or ``checkpoint_dir`` cannot be written; the run
            directory is then removed again.
    """
    try:
        run_dir = layout.create_run_dir(cfg.output_dir, cfg.name)
    except OSError as exc:
        raise ConfigError(
            f"{cfg.source}: output_dir {cfg.output_dir!r} is unusable ({exc.strerror or exc}); "
            "point output_dir at a writable directory"
        ) from None
    try:
        return _fill_run_dir(cfg, run_dir)
    except BaseException:
        # A run refused before its first episode leaves no empty run directory behind.
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _fill_run_dir(cfg: Config, run_dir: Path) -> tuple[Path, Path | None]:
    # 0o664, not write_text's 0o666: never world-writable, even under umask 000.
    fd = os.open(run_dir / "config.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))
    if cfg.runtime.checkpoint_dir is None:
        return run_dir, None
    loc = parse_location(cfg.runtime.checkpoint_dir)
    if not loc.is_local:
        # An fsspec URL (s3://bucket/prefix) is used as is, like an absolute path; the
        # writer reports a missing bucket or credentials (docs/OBJECT_STORAGE.md).
        return run_dir, URLPath(loc.path)
    ckpt_dir = run_dir / loc.path  # an absolute path (or file://) replaces run_dir
    try:
        layout.make_dirs(ckpt_dir)
        if not os.access(ckpt_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise ConfigError(
            f"{cfg.source}: runtime.checkpoint_dir {cfg.runtime.checkpoint_dir!r} is unusable "
            f"({ckpt_dir}: {exc.strerror or exc}); point it at a writable directory"
        ) from None
    return run_dir, ckpt_dir
