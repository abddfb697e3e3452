"""The writer process of the journal design (a benchmark prototype, not shipped).

Reads ``<episode> <entries> <nbytes>`` lines on stdin; for each (coalescing to the newest
line already waiting) it reads the journal's new bytes, commits a checkpoint with
:class:`~ckptwriter.storage.local.LocalStorage` (incremental, like the thread writer),
moves ``latest``, applies ``last_n`` and prints ``<episode> <perf_counter>`` once durable.
``perf_counter`` is CLOCK_MONOTONIC, so the parent can compare it with its own clock.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import datetime, timezone

from ckptwriter.manifest import dump_json
from ckptwriter.memory import MemoryCapture
from ckptwriter.retention import make_policy, select_for_deletion
from ckptwriter.snapshot import CapturedSnapshot
from ckptwriter.storage.local import LocalStorage


def _commands(fd: int) -> list[tuple[int, int, int]]:
    """Block for at least one command line, then take every line already waiting."""
    buf = b""
    os.set_blocking(fd, True)
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise EOFError
        buf += chunk
        if buf.endswith(b"\n"):
            break
    os.set_blocking(fd, False)
    try:
        while chunk := os.read(fd, 1 << 16):
            buf += chunk
    except BlockingIOError:
        pass
    while not buf.endswith(b"\n"):  # finish a half-read line
        os.set_blocking(fd, True)
        buf += os.read(fd, 1 << 16)
    return [(int(a), int(b), int(c)) for a, b, c in (ln.split() for ln in buf.splitlines())]


def main(journal: str, root: str, keep_last: int) -> None:
    storage = LocalStorage(root)
    known = {r.name: r for r in storage.open()}
    policy = make_policy("last_n", keep_last)
    jfd = os.open(journal, os.O_RDONLY)
    chunks: list[bytes] = []
    ends: list[int] = []
    have = 0
    log_id = uuid.uuid4().hex
    agent_json = dump_json({"agent_type": "BenchAgent", "memory_type": "history", "config": {}})
    prev = None
    out = sys.stdout.buffer
    try:
        while True:
            try:
                ep, entries, nbytes = _commands(0)[-1]
            except EOFError:
                break
            if nbytes > have:
                chunks.append(os.pread(jfd, nbytes - have, have))
                have = nbytes
                ends.append(have)
            cap = MemoryCapture(log_id=log_id, entries=entries, nbytes=nbytes, chunks=chunks,
                                chunk_ends=ends, n_chunks=len(chunks))
            snap = CapturedSnapshot(
                episode_index=ep, train_steps_total=ep * 4, agent_type="BenchAgent",
                memory_type="history", val_score=None, memory=cap, agent_json=agent_json,
                extra_files={}, resumed_from=None, timestamp=datetime.now(timezone.utc),
                captured_at=time.perf_counter(),
            )
            outcome = storage.commit(snap, prev)
            prev = outcome.memory
            storage.set_latest(outcome)
            known[outcome.name] = outcome.record
            for name in select_for_deletion(list(known.values()), policy,
                                            protected={outcome.name}):
                storage.delete(name)
                del known[name]
            out.write(f"{ep} {time.perf_counter()!r}\n".encode())
            out.flush()
    finally:
        storage.close()
        os.close(jfd)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
