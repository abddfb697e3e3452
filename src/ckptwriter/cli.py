"""The ``ckptwriter`` command line: train, ls, show, verify, du, bench.

Exit codes: 0 success; 1 a checkpoint error (not found, broken, write failed), an
error raised by the agent, or a failed ``verify``; 2 a configuration or usage error;
130/143/129 training stopped by SIGINT/SIGTERM/SIGHUP after its final checkpoint. A
training that ends early, by a signal or an error, names the last durable checkpoint and
the ``resume_from`` that continues from it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio
from rich.console import Console
from rich.table import Table

from . import layout
from .errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, ConfigError
from .reader import CheckpointFallbackWarning

if TYPE_CHECKING:
    from .runtime import TrainResult
    from .runtime.inspection import CheckpointsDir

__all__ = ["main"]

log = logging.getLogger("ckptwriter")

EXIT_ERROR = 1
EXIT_CONFIG = 2
# Where `train` writes by default (the config's output_dir), so `ls`/`du` look there.
DEFAULT_OUTPUTS = "outputs"


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ckptwriter",
        description="Train with crash-safe asynchronous checkpoints, and inspect them.",
        epilog="`ckptwriter --config FILE` (and `python -m ckptwriter --config FILE`) is "
               "short for `ckptwriter train --config FILE`.",
    )
    parser.add_argument("--version", action="version", version=f"ckptwriter {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (`ckptwriter COMMAND --help` for more)")

    train = sub.add_parser("train", help="run a training configuration")
    train.add_argument("--config", required=True, metavar="FILE", help="YAML configuration")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override a setting, e.g. --set runtime.max_envs_to_visit=200 (repeatable)",
    )
    train.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bar and only warnings in the log")
    train.add_argument(
        "--resume", metavar="auto|best|PATH",
        help="set runtime.resume_from: auto (this run name's newest checkpoint, continued "
        "in place; a fresh start if none), best, or a checkpoint path",
    )

    for name, text, what in (
        ("ls", "list checkpoints (checkpoints dir, run dir or outputs/<run_name>/)",
         "what to list"),
        ("show", "show one checkpoint's manifests and memory entry counts",
         "a checkpoint directory, or a `latest`/`best` pointer"),
        ("verify", "check every file's size and sha256; non-zero exit if one is broken",
         "a checkpoint, a checkpoints dir, a run dir or outputs/<run_name>/"),
        ("du", "disk use per run and per checkpoint", "what to measure"),
    ):
        p = sub.add_parser(name, help=text)
        if name in ("ls", "du"):
            p.add_argument("path", metavar="PATH", nargs="?", default=DEFAULT_OUTPUTS,
                           help=f"{what}: a checkpoints dir, a run dir, outputs/<run_name>/ "
                                f"or outputs/ (default: {DEFAULT_OUTPUTS})")
        else:
            p.add_argument("path", metavar="PATH", help=what)
    sub.add_parser("bench", add_help=False, help="measure submit() stall, freshness and "
                   "throughput on your disk (see `ckptwriter bench --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and (args_list[0] == "--config" or args_list[0].startswith("--config=")):
        # The guide's `python -m src.main --config stage1.yaml`: training is the command.
        args_list.insert(0, "train")
    if args_list and args_list[0] == "bench":
        # The benchmark owns its arguments; imported lazily so the CLI starts fast.
        bench = importlib.import_module("ckptwriter.bench")
        return int(bench.main(args_list[1:]))
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    try:
        with _warnings_to_log():
            if args.command == "train":
                # --resume is resume_from as given (a path is not parsed as YAML).
                resume = [] if args.resume is None else [
                    f"runtime.resume_from={json.dumps(args.resume)}"]
                return _train(args.config, [*args.overrides, *resume], quiet=args.quiet)
            out = _stdout()
            if args.command == "ls":
                return _ls(args.path, out)
            if args.command == "show":
                return _show(args.path, out)
            if args.command == "verify":
                return _verify(args.path, out)
            return _du(args.path, out)
    except ConfigError as exc:
        _print_error(exc)
        return EXIT_CONFIG
    except CheckpointError as exc:
        _print_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _print_error(exc: BaseException) -> None:
    print(f"error: {exc}", file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):
        print(note, file=sys.stderr)


def _terminal_gone() -> None:
    """Point stdout and stderr at /dev/null: the terminal they wrote to is gone.

    A dropped ssh connection hangs up the run (SIGHUP) and makes every later write to
    its terminal fail with EIO. The run still saves its final checkpoint and exits 129;
    without this, the first failed write (the progress bar's last frame, the summary,
    Python's final flush) would turn that exit code into 1 or 120.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _stdout() -> Console:
    # Not a terminal (a pipe, a test): wide enough that paths are never cut.
    return Console(highlight=False, soft_wrap=True,
                   width=None if sys.stdout.isatty() else 200)


@contextlib.contextmanager
def _warnings_to_log() -> Iterator[None]:
    # A CheckpointFallbackWarning is news for the user, printed when it happens (not at
    # exit, and not as a Python warning trace with a source line).
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default", CheckpointFallbackWarning)
        warnings.showwarning = show
        yield


# -- train -----------------------------------------------------------------------------


def _train(config: str, overrides: list[str], *, quiet: bool) -> int:
    from .config import load_config
    from .runtime import NullReporter, RichReporter, run_training
    from .runtime.progress import Reporter, is_terminal_error, log_formatter, progress_enabled

    cfg = load_config(config, overrides)
    search_dirs = (str(Path.cwd()), str(Path(config).resolve().parent))
    bar = RichReporter() if progress_enabled(sys.stderr, quiet) else None
    handler: logging.Handler = bar.log_handler if bar else logging.StreamHandler(sys.stderr)
    # The same lines above the bar as in a pipe or a log file.
    handler.setFormatter(log_formatter())
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    reporter: Reporter = bar if bar else NullReporter()
    try:
        with bar if bar else contextlib.nullcontext():
            result = anyio.run(
                lambda: run_training(cfg, reporter=reporter, handle_signals=True,
                                     search_dirs=search_dirs)
            )
    except (CheckpointError, ConfigError):
        raise
    except Exception as exc:
        # The agent's (or the environment's) own exception: its traceback, then where to
        # continue from (tracebacks print notes themselves from Python 3.11 on).
        traceback.print_exc()
        if sys.version_info < (3, 11):
            for note in getattr(exc, "__notes__", ()):
                print(note, file=sys.stderr)
        return EXIT_ERROR
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    if bar is not None and bar.terminal_lost:
        _terminal_gone()
    try:
        _summary(result, auto=cfg.runtime.resume_from == "auto")
    except OSError as exc:
        if not is_terminal_error(exc):
            raise
        _terminal_gone()
    return result.exit_code


def _summary(result: TrainResult, *, auto: bool = False) -> None:
    from .runtime.loop import failure_summary, resume_hint
    from .runtime.progress import display_path

    out = Console(highlight=False, soft_wrap=True)
    done = result.last_episode - result.first_episode
    how = "Stopped" if result.stopped_by else "Finished"
    val = "" if result.val_score is None else f", last val_score {result.val_score:.3f}"
    out.print(f"{how} at episode {result.last_episode}/{result.target_episode} "
              f"({done} episodes, {result.train_steps_total} steps total{val}, "
              f"{result.elapsed_seconds:.2f} s)", markup=False)
    if result.checkpoint_dir is None:
        out.print(f"Checkpointing was off; run directory: {display_path(result.run_dir)}",
                  markup=False)
        return
    latest = f" (latest -> {result.latest_checkpoint})" if result.latest_checkpoint else ""
    out.print(f"Checkpoints are in {display_path(result.checkpoint_dir)}{latest}",
              markup=False)
    failed = failure_summary(result.checkpoints_failed, result.durable_checkpoint)
    if failed:
        out.print(failed, markup=False)
    if result.stopped_by:
        out.print(resume_hint(result.durable_checkpoint, auto=auto), markup=False)
    out.file.flush()


# -- ls / show / verify / du -----------------------------------------------------------


def _ls(path: str, out: Console) -> int:
    from .runtime.inspection import (
        best_name,
        disk_usage,
        find_checkpoint_dirs,
        format_age,
        format_size,
        latest_name,
    )

    for cdir in find_checkpoint_dirs(path):
        pointers = {layout.LATEST_LINK: latest_name(cdir.path),
                    layout.BEST_LINK: best_name(cdir.path)}
        table = Table(title=str(cdir.path), title_justify="left")
        for col, kw in (("name", {"no_wrap": True}), ("episode", {"justify": "right"}),
                        ("steps", {"justify": "right"}), ("val_score", {"justify": "right"}),
                        ("size", {"justify": "right"}), ("age", {"justify": "right"}),
                        ("pointer", {}), ("status", {})):
            table.add_column(col, **kw)
        infos = cdir.checkpoints()
        for info in infos:
            rt = info.runtime
            marks = [p for p, name in pointers.items() if name == info.name]
            table.add_row(
                info.name,
                str(info.episode_index),
                str(rt.train_steps_total) if rt else "-",
                f"{rt.val_score:.3f}" if rt and rt.val_score is not None else "-",
                format_size(disk_usage(info.path)) if info.complete else "-",
                format_age(rt.timestamp if rt else None),
                f"<- {', '.join(marks)}" if marks else "",
                "complete" if info.complete else f"INCOMPLETE ({info.problem})",
            )
        out.print(table)
        if not infos:
            out.print("  (no checkpoints)", markup=False)
    return 0


def _show(path: str, out: Console) -> int:
    from .errors import UnknownEntryTypeError
    from .reader import load_checkpoint

    try:
        ck = load_checkpoint(path)  # built-in entries fully checked
    except UnknownEntryTypeError:
        # The user's own types: read raw (no class needed, none imported), each line
        # still checked to be an object with a string tag.
        ck = load_checkpoint(path, raw=True)
    out.print(f"Checkpoint {ck.path}", markup=False)
    out.print(f"\n{layout.RUNTIME_JSON}:", markup=False)
    out.print(json.dumps(ck.runtime.model_dump(mode="json"), indent=2), markup=False)
    out.print(f"\n{layout.AGENT_JSON}:", markup=False)
    out.print(json.dumps(ck.agent.model_dump(mode="json", by_alias=True), indent=2),
              markup=False)
    classes = {tag: rec.class_ for tag, rec in getattr(ck.agent, "entry_types", {}).items()}
    _show_log(out, f"memory ({ck.runtime.memory_snapshot_path})", ck.memory, classes)
    logs: dict[str, Any] = getattr(ck, "logs", None) or {}
    for name in sorted(logs):
        _show_log(out, f"log {name}", logs[name], classes)
    for name in sorted(ck.extra_files):
        out.print(f"extra file: {name} ({len(ck.extra_files[name])} bytes)", markup=False)
    return 0


def _show_log(out: Console, what: str, log: Any, classes: dict[str, str]) -> None:
    """A log's entry count by tag (the built-ins always), with each tag's recorded class."""
    counts: dict[str, int] = log.counts_by_type()
    out.print(f"\n{what}: {len(log)} entries", markup=False)
    builtins = ("Observation", "Action", "Feedback", "Reflection")
    for tag in (*builtins, *sorted(set(counts) - set(builtins))):
        cls = classes.get(tag)
        out.print(f"  {tag:<12} {counts.get(tag, 0)}" + (f"  ({cls})" if cls else ""),
                  markup=False)


def _verify(path: str, out: Console) -> int:
    from .reader import verify_checkpoint
    from .runtime.inspection import checkpoint_at, find_checkpoint_dirs

    single = checkpoint_at(path)  # a URL stays a URL (a URLPath)
    targets: list[tuple[Path, CheckpointsDir | None]] = []
    broken = retired = 0
    if single is not None:
        targets.append((single, None))
    else:
        for cdir in find_checkpoint_dirs(path):
            # One view of a live run: latest judged against a listing it agrees with.
            infos, latest = cdir.listing()
            targets += [(info.path, cdir) for info in infos]
            if latest.name is not None and latest.name not in {i.name for i in infos}:
                out.print(f"BROKEN  {cdir.path / layout.LATEST_LINK}: points at {latest.name}, "
                          "which does not exist", markup=False)
                broken += 1
            elif latest.problem is not None:
                out.print(f"BROKEN  {cdir.path}: {latest.problem}", markup=False)
                broken += 1
            if latest.json_problem is not None:
                out.print(f"WARN    {cdir.path / layout.LATEST_JSON}: {latest.json_problem}",
                          markup=False)
    for ckpt, listed_in in targets:
        try:
            rt = verify_checkpoint(ckpt)
        except CheckpointNotFoundError:
            if listed_in is None:
                raise
            problem = listed_in.problem_of(ckpt.name)
            if problem is None:  # listed, then deleted (a live writer's retention, as a rule)
                retired += 1
                out.print(f"RETIRED {ckpt}: no longer there (deleted while verify ran, by a "
                          "live writer's retention or by hand; nothing to check)", markup=False)
                continue
            broken += 1
            out.print(f"BROKEN  {ckpt}: {problem}", markup=False)
            continue
        except CheckpointCorruptError as exc:
            broken += 1
            out.print(f"BROKEN  {ckpt}: {exc.file}: {exc.problem}{_shared(ckpt, exc.file)}",
                      markup=False)
            continue
        out.print(f"OK      {ckpt} ({len(rt.files)} files, episode {rt.episode_index})",
                  markup=False)
    if not targets:
        out.print("no checkpoints found", markup=False)
        return EXIT_ERROR
    total = len(targets) - retired
    out.print(f"{total - min(broken, total)}/{total} checkpoints OK"
              + (f", {broken} problem(s)" if broken else "")
              + (f"; {retired} retired while verifying" if retired else ""), markup=False)
    return EXIT_ERROR if broken else 0


def _shared(ckpt: Path, file: str) -> str:
    """A file linked from checkpoint to checkpoint breaks each of them: say which."""
    from .runtime.inspection import shared_with

    others = shared_with(ckpt, file)
    return f" (shared with {', '.join(others)})" if others else ""


def _du(path: str, out: Console) -> int:
    from .runtime.inspection import disk_usage, find_checkpoint_dirs, format_size

    grand = 0
    # Shared by the run totals, as `du -s A B` shares them: a file hard-linked into two
    # runs counts in the first only, and the grand total is the disk the runs occupy.
    seen: set[tuple[int, int]] = set()
    seen_runs: set[Path] = set()
    for cdir in find_checkpoint_dirs(path):
        for info in cdir.checkpoints():
            out.print(f"{format_size(disk_usage(info.path)):>12}  {info.path}", markup=False)
        top = cdir.run_dir or cdir.path
        if top in seen_runs:
            continue
        seen_runs.add(top)
        size = disk_usage(top, seen)
        grand += size
        out.print(f"{format_size(size):>12}  {top}  (run total)", markup=False)
    if len(seen_runs) > 1:
        out.print(f"{format_size(grand):>12}  total", markup=False)
    return 0
