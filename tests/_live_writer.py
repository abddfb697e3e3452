"""A writer of a live run in its own process, for the tests of readers that race it.

``python _live_writer.py LOCATION MAX_COMMITS`` commits episodes back to back into
``LOCATION`` with ``keep_last=2`` (retention retires a checkpoint at every new episode)
and re-commits every episode once with ``replace=True`` right after its first commit
(on object storage with byte-identical files, the only re-commit it accepts: a new
``runtime.json`` over the same objects; on disk with one more memory entry, so the
directory is swapped for another). Scores go up and down, so ``best`` moves and its
checkpoint is re-committed and retired too. It prints ``ready`` once the first
checkpoint and both pointers exist, and stops when its stdin closes (or after
``MAX_COMMITS``), printing ``{"commits": N, "episode": E}``.
"""

from __future__ import annotations

import json
import sys
import threading

# The scores of consecutive episodes: best moves forward, and stays a while.
_SCORES = (0.5, 0.2, 0.7, 0.1, 0.9, 0.3, 0.95, 0.4)


def _main(location: str, max_commits: int) -> None:
    from ckptwriter import MemoryLog, Observation, Snapshot, SyncCheckpointWriter

    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    object_store = "://" in location
    memory = MemoryLog()
    commits = ep = 0
    with SyncCheckpointWriter(location, keep_last=2, fsync=False, executor="thread") as w:
        while commits < max_commits and not (commits and stop.is_set()):
            ep += 1
            score = _SCORES[ep % len(_SCORES)]
            for replace in (False, True):
                if not (replace and object_store):
                    memory.append(Observation(content=f"episode {ep} replace {replace}"))
                w.submit(Snapshot(ep, ep, "HistoryAgent", memory, val_score=score),
                         replace=replace).wait()
                commits += 1
                if commits == 1:
                    print("ready", flush=True)
    print(json.dumps({"commits": commits, "episode": ep}), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]))
