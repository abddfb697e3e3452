"""The benchmark suite of ckptwriter (``python -m benchmarks``; ``make bench``).

The measurement code ships in :mod:`ckptwriter.bench` (users run it as
``ckptwriter bench``); this package adds the comparison baselines that do not ship:
a naive synchronous writer, a thread that rewrites the whole memory, and a prototype
of the other design DESIGN.md weighs, a writer process fed by an append-only journal.
"""
