"""Upload throughput and event-loop stall of checkpoints written to S3.

Starts moto's S3 server as a separate process on 127.0.0.1 (so its CPU work does not
compete with this process for the GIL), points s3fs at it with ``AWS_ENDPOINT_URL``,
and measures:

1. throughput: a full checkpoint of a large memory file (concurrent multipart parts),
   then incremental checkpoints that copy the unchanged prefix server-side
   (UploadPartCopy) and upload only what was appended, each through a
   ``CheckpointWriter`` and timed from capture to durable;
2. loop stall: an asyncio loop doing a fixed ~0.5 ms of pure-Python work per step
   (calibrated), submitting a
   checkpoint every N steps, compared with the same loop without a writer, at the
   default GIL switch interval and at the 0.5 ms the ckptwriter runtime uses.

moto keeps objects in memory and hashes every part in Python: absolute numbers are a
floor set by the emulator, not by S3. Compare runs on one machine, not across.

Usage: ``python -m benchmarks.bench_s3 [--memory-mib 64] [--append-mib 1] [--checkpoints 6]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .workload import burn_cpu, calibrate_burn

BUCKET = "ckptwriter-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a child process; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _grow(memory: object, nbytes: int) -> None:
    from ckptwriter import MemoryLog, Observation

    assert isinstance(memory, MemoryLog)
    line = "x" * 1000
    target = memory.nbytes + nbytes
    i = 0
    while memory.nbytes < target:
        memory.append(Observation(content=f"{i} {line}"))
        i += 1


def bench_throughput(url: str, memory_mib: int, append_mib: int, checkpoints: int) -> None:
    """Full and incremental checkpoints, each awaited before the memory grows again."""
    asyncio.run(_throughput(url, memory_mib, append_mib, checkpoints))


async def _throughput(url: str, memory_mib: int, append_mib: int, checkpoints: int) -> None:
    from ckptwriter import CheckpointWriter, MemoryLog, Snapshot

    memory = MemoryLog()
    _grow(memory, memory_mib * 2**20)
    async with CheckpointWriter(url, strategy="all", on_backlog="block") as writer:
        for ep in range(1, checkpoints + 1):
            if ep > 1:
                _grow(memory, append_mib * 2**20)
            handle = await writer.submit(Snapshot(ep, ep, "BenchAgent", memory))
            out = await handle.wait()
            # Capture to durable: the upload, the commit marker and the pointer.
            dt = out.latency_seconds
            kind = "incremental" if out.incremental else "full"
            mib = out.bytes_serialized / 2**20
            print(f"  ep {ep}: {kind:<11} file {memory.nbytes / 2**20:7.1f} MiB, "
                  f"uploaded {mib:6.1f} MiB in {dt * 1000:7.1f} ms "
                  f"({mib / dt:6.1f} MiB/s uploaded, {memory.nbytes / 2**20 / dt:6.1f} MiB/s "
                  "of checkpoint)")


async def _loop(url: str | None, steps: int, every: int, append_mib: int,
                base_mib: int, work: int) -> tuple[list[float], int]:
    from ckptwriter import CheckpointWriter, MemoryLog, Snapshot

    memory = MemoryLog()
    _grow(memory, base_mib * 2**20)
    times: list[float] = []

    async def run(writer: CheckpointWriter | None) -> int:
        handles = []
        for step in range(steps):
            if step and step % every == 0:
                # Growing the memory is the loop's own work, the same with or without a
                # writer: it is kept out of the measured step.
                _grow(memory, append_mib * 2**20 // 8)
            t0 = time.perf_counter()
            # A fixed amount of pure-Python work: a writer that takes the GIL or a
            # core away from the loop makes it take longer.
            burn_cpu(work)
            if writer is not None and step and step % every == 0:
                handles.append(await writer.submit(Snapshot(step, step, "Bench", memory)))
            await asyncio.sleep(0)
            times.append(time.perf_counter() - t0)
        for h in handles:
            await h.wait()
        return len(handles)

    if url is None:
        return times, await run(None)
    async with CheckpointWriter(url, max_pending=2, on_backlog="coalesce") as w:
        written = await run(w)
    return times, written


class _GenTwoPauses:
    """Full (generation 2) garbage collections and how long each held the GIL.

    With a large memory log in the heap these pauses, not the writer, set the worst
    single step: they are printed beside each run so the two are not confused.
    """

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif info["generation"] == 2:
            self.pauses.append(time.perf_counter() - self._t0)

    def __enter__(self) -> _GenTwoPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def bench_stall(endpoint_url: str, steps: int, every: int, append_mib: int,
                base_mib: int) -> None:
    """Per-step loop time with and without a writer uploading to S3."""
    from ckptwriter import switch_interval

    work = calibrate_burn(0.0005)

    def report(label: str, times: list[float], written: int, gcs: _GenTwoPauses) -> None:
        ms = sorted(t * 1000 for t in times)
        p99 = ms[int(0.99 * (len(ms) - 1))]
        worst_gc = max(gcs.pauses, default=0.0) * 1000
        print(f"  {label:<30} p50 {statistics.median(ms):6.3f} ms  p99 {p99:6.3f} ms  "
              f"max {ms[-1]:7.3f} ms  total {sum(ms) / 1000:5.2f} s  checkpoints {written}  "
              f"(full GCs {len(gcs.pauses)}, longest {worst_gc:.0f} ms)")

    for label, interval in (("default switch interval", None), ("switch_interval(0.0005)", 5e-4)):
        print(f" {label}:")
        with switch_interval(interval) if interval else _nothing():
            with _GenTwoPauses() as gcs:
                times, n = asyncio.run(_loop(None, steps, every, append_mib, base_mib, work))
            report("no writer", times, n, gcs)
            url = f"s3://{BUCKET}/stall-{uuid.uuid4().hex[:8]}/checkpoints"
            with _GenTwoPauses() as gcs:
                times, n = asyncio.run(_loop(url, steps, every, append_mib, base_mib, work))
            report("writer uploading to S3 (moto)", times, n, gcs)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks against a fresh moto server; print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=64, help="memory file at ep 1")
    parser.add_argument("--append-mib", type=int, default=1, help="appended per checkpoint")
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4000, help="loop steps for the stall test")
    parser.add_argument("--every", type=int, default=200, help="steps between checkpoints")
    args = parser.parse_args(argv)

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    print("store: moto S3 server (separate process) on 127.0.0.1 via s3fs + AWS_ENDPOINT_URL")
    with moto_server() as endpoint:
        os.environ.update({
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
        })
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        print(f"\nthroughput ({args.memory_mib} MiB memory, +{args.append_mib} MiB per "
              "checkpoint):")
        bench_throughput(f"s3://{BUCKET}/throughput/checkpoints", args.memory_mib,
                         args.append_mib, args.checkpoints)
        print(f"\nloop stall ({args.steps} steps of 0.5 ms, a checkpoint every {args.every} "
              f"steps, {args.memory_mib} MiB memory growing):")
        bench_stall(endpoint, args.steps, args.every, args.append_mib, args.memory_mib)
        s3fs.S3FileSystem.clear_instance_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
