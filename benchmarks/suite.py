"""The suite: run the benchmarks one at a time, judge the targets, write the results.

``python -m benchmarks`` (``make bench``) is :func:`main`. Every figure is a median over
repeats, and every ratio is measured side by side in one run, so the noise of a shared
machine hits both sides of it alike.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from .baselines import BASELINES
from .floor import bench_floor
from .loading import bench_load
from .loop import Variant
from .machine import machine_info
from .overhead import bench_overhead
from .report import Report, format_markdown, print_report, write_json
from .serialization import bench_encode, bench_incremental
from .sizes import SIZES, BenchConfig
from .stall import Option, bench_gil_options, bench_stall_freshness, executor_options
from .throughput import bench_throughput
from .workload import calibrate_burn, entry_pool

__all__ = ["BENCHMARKS", "RESULTS", "build_parser", "config_from_args", "main", "run_suite"]

BENCHMARKS = ("encode", "stall", "overhead", "options", "throughput", "incremental",
              "load", "floor")
RESULTS = Path(__file__).resolve().parent / "results"


def run_suite(
    cfg: BenchConfig,
    target_dir: str | os.PathLike[str],
    *,
    only: Sequence[str] = BENCHMARKS,
    baselines: dict[str, Variant] | None = None,
    options: dict[str, Option] | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the benchmarks in ``only``, one at a time, in ``target_dir``.

    Args:
        cfg: sizes.
        target_dir: a directory on the disk to measure (scratch dirs go inside it).
        only: names from ``BENCHMARKS``.
        baselines: extra loop variants shown beside the overhead figure.
        options: where-the-writer-runs options besides :func:`executor_options`.
        log: progress lines.

    Raises:
        ValueError: a name in ``only`` is not a benchmark.
    """
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHMARKS}")
    base = Path(target_dir)
    base.mkdir(parents=True, exist_ok=True)
    report = Report(machine=machine_info(base), config=asdict(cfg),
                    started=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    t0 = time.perf_counter()
    pool = entry_pool()
    burn_n = calibrate_burn(cfg.episode_cpu_s) if {"stall", "overhead", "options",
                                                    "floor"} & set(only) else 0
    report.config["burn_iterations"] = burn_n
    steps: dict[str, Callable[[], None]] = {
        "encode": lambda: bench_encode(cfg, report, pool=pool, log=log),
        "stall": lambda: bench_stall_freshness(cfg, base, report, pool=pool, burn_n=burn_n,
                                               log=log),
        "overhead": lambda: bench_overhead(cfg, base, report, pool=pool, burn_n=burn_n,
                                           baselines=baselines, log=log),
        "options": lambda: bench_gil_options(cfg, base, report, pool=pool, burn_n=burn_n,
                                             options=executor_options() | (options or {}),
                                             log=log),
        "throughput": lambda: bench_throughput(cfg, base, report, log=log),
        "incremental": lambda: bench_incremental(cfg, base, report, pool=pool, log=log),
        "load": lambda: bench_load(cfg, base, report, pool=pool, log=log),
        "floor": lambda: bench_floor(cfg, base, report, pool=pool, burn_n=burn_n, log=log),
    }
    for name in BENCHMARKS:
        if name in only:
            try:
                steps[name]()
            except Exception as exc:
                # One broken benchmark (a full disk, say) must not lose the others.
                log(f"  {name}: FAILED: {type(exc).__name__}: {exc}")
                report.errors[name] = f"{type(exc).__name__}: {exc}"
    report.seconds = time.perf_counter() - t0
    report.machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    order = {f.id.split(".")[0]: i for i, f in enumerate(sorted(report.figures,
                                                                key=lambda f: f.id))}
    report.figures.sort(key=lambda f: (order[f.id.split(".")[0]], f.passed is None))
    return report


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    """The suite's command-line options."""
    ap = argparse.ArgumentParser(prog=prog, description=(
        "The ckptwriter benchmark suite: submit() stall, overhead, freshness, throughput "
        "and incremental scaling of a CPU-bound training loop, judged against the "
        "performance targets, beside comparison baselines."))
    ap.add_argument("--memory-entries", type=int, metavar="N", default=None,
                    help="entries in the large memory of the stall/freshness runs and of "
                         "the incremental run (default 1,000,000; 200,000 with --quick)")
    ap.add_argument("--dir", metavar="PATH", default=None,
                    help="directory on the disk to measure (default: a temp dir in "
                         "benchmarks/)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, a couple of minutes")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", metavar="NAME", action="append", choices=BENCHMARKS,
                    help=f"run only these benchmarks (repeatable): {', '.join(BENCHMARKS)}")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3)")
    ap.add_argument("--json", metavar="FILE", default=None,
                    help="write the results here instead of benchmarks/results/")
    ap.add_argument("--markdown", metavar="FILE", default=None,
                    help="also write the table as Markdown here")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 when a target is missed")
    return ap


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Sizes from parsed arguments."""
    cfg = SIZES[args.size or ("quick" if args.quick else "full")]
    if args.memory_entries is not None:
        if args.memory_entries < 1:
            raise SystemExit(
                f"--memory-entries must be >= 1, got {args.memory_entries}; "
                "pass the number of entries your agent's memory reaches"
            )
        cfg = replace(cfg, large_memory=args.memory_entries, incr_entries=args.memory_entries)
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
        cfg = replace(cfg, repeats=args.repeats, loop_repeats=args.repeats)
    return cfg


def main(argv: list[str], *, baselines: dict[str, Variant] | None = None) -> int:
    """Run the suite with the baselines, print the table and write the JSON results.

    Args:
        argv: command-line arguments (see :func:`build_parser`).
        baselines: loop variants beside the overhead figure (default ``BASELINES``).

    Returns:
        0; 1 when a benchmark failed, or with ``--strict`` when a target was missed.
    """
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    only = tuple(args.only or BENCHMARKS)
    base = Path(args.dir) if args.dir else RESULTS.parent
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckptwriter-bench-", dir=base) as tmp:
        report = run_suite(cfg, tmp, only=only,
                           baselines=BASELINES if baselines is None else baselines)
    print_report(report)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    # --json redirects the results (the smoke test); else a timestamped file, and a
    # full-size run of every benchmark also becomes the committed reference.
    paths = [Path(args.json)] if args.json else [RESULTS / f"{stamp}.json"]
    if not args.json and args.size in (None, "full") and not args.quick and not args.only:
        paths.append(RESULTS / "latest.json")
    for path in paths:
        write_json(report, path)
        print(f"results: {path}")
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(report), encoding="utf-8")
    missed = [f for f in report.figures if f.passed is False]
    return 1 if report.errors or (args.strict and missed) else 0
