"""``python -m benchmarks``: the full suite with baselines; results under results/."""

from __future__ import annotations

import sys

from .suite import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
