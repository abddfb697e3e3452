"""The benchmark suite of ckptwriter (``python -m benchmarks``; ``make bench``).

The measurement code ships in :mod:`ckptwriter.bench` (users run it as
``ckptwriter bench``); this package adds the comparison baselines that do not ship:
a naive synchronous writer and a thread that rewrites the whole memory.
"""
