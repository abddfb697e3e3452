"""The benchmark suite of ckptwriter (``python -m benchmarks``; ``make bench``).

Not part of the wheel, and built on ckptwriter's public API only. It judges the
performance targets (issue 4), one module per group of them:

1. ``submit()`` stall: p99 <= 1 ms, and p99 at a large memory within 1.5x of a small one
   (``stall``).
2. Overhead of checkpointing every episode of a CPU-bound loop: <= 3 % (``overhead``,
   beside the naive writers of ``baselines``).
3. Freshness (submit to durable) p99 <= 100 ms under that loop, large memory (``stall``,
   with the executor and switch-interval options).
4. A full write of a 1 GiB memory >= 80 % of raw write+fsync throughput (``throughput``).
5. Incremental scaling (~1.0x the final memory serialized) and encoding >= 200 MB/s
   (``serialization``).
6. Retention + ``latest`` pointer add <= 1 ms to the loop and nothing to the stall
   (``overhead``).

``suite`` runs them and writes the results (``report``: table, Markdown, JSON);
``loop`` is the training loop they time, ``workload`` what it feeds the writer,
``sizes`` how big each run is, ``machine`` what it ran on. ``bench_s3`` measures object
storage against a local moto server. Users measure their own disk with the small
``ckptwriter bench`` that ships in the wheel.
"""
