"""``python -m benchmarks``: the full suite with baselines; results under results/."""

from __future__ import annotations

import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ckptwriter import bench

from .baselines import BASELINES, options

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    """Run the suite (same options as ``ckptwriter bench``) and write the JSON results."""
    args = bench.build_parser("python -m benchmarks").parse_args(argv)
    cfg = bench.config_from_args(args)
    only = tuple(args.only or bench.BENCHMARKS)
    base = Path(args.dir) if args.dir else RESULTS.parent
    with tempfile.TemporaryDirectory(prefix="ckptwriter-bench-", dir=base) as tmp:
        report = bench.run_suite(cfg, tmp, only=only, baselines=BASELINES, options=options())
    bench.print_report(report)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for path in (RESULTS / f"{stamp}.json", Path(args.json) if args.json else None):
        if path is not None:
            bench.write_json(report, path)
    # Only a full-size run of every benchmark becomes the committed reference.
    if args.size in (None, "full") and not args.quick and not args.only:
        bench.write_json(report, RESULTS / "latest.json")
    print(f"results: {RESULTS / f'{stamp}.json'}")
    missed = [f for f in report.figures if f.passed is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
