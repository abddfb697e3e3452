"""``python -m benchmarks``: the full suite with baselines; results under results/."""

from __future__ import annotations

import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ckptwriter import bench

from .baselines import BASELINES

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    """Run the suite (same options as ``ckptwriter bench``) and write the JSON results."""
    args = bench.build_parser("python -m benchmarks").parse_args(argv)
    cfg = bench.config_from_args(args)
    only = tuple(args.only or bench.BENCHMARKS)
    base = Path(args.dir) if args.dir else RESULTS.parent
    with tempfile.TemporaryDirectory(prefix="ckptwriter-bench-", dir=base) as tmp:
        report = bench.run_suite(cfg, tmp, only=only, baselines=BASELINES)
    bench.print_report(report)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    # --json redirects the results (the smoke test); else a timestamped file, and a
    # full-size run of every benchmark also becomes the committed reference.
    paths = [Path(args.json)] if args.json else [RESULTS / f"{stamp}.json"]
    if not args.json and args.size in (None, "full") and not args.quick and not args.only:
        paths.append(RESULTS / "latest.json")
    for path in paths:
        bench.write_json(report, path)
        print(f"results: {path}")
    if args.markdown:
        Path(args.markdown).write_text(bench.format_markdown(report), encoding="utf-8")
    missed = [f for f in report.figures if f.passed is False]
    return 1 if report.errors or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
